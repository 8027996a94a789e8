"""GPU check: T-LoRA Train and Loader at real size on one CUDA GPU, against ComfyUI's own paths.

One command, no download, made to finish in under 8 minutes on one H100 (80 GB). Two parts
(``--parts``): the families' sections below, then the streaming part (:mod:`gpu_streaming`:
FLUX.1 at real widths, depth-reduced, trained at VRAM budgets of 24, 16 and 12 GiB scaled to the
model, with ComfyUI's reused cast buffers, against the bare frozen model's step, on fp8-scaled and
GGUF bases). The families' part builds SDXL (real size, bf16) and FLUX.1 (real widths, fp8 storage, bf16 compute; DEPTH-REDUCED
to 2 double + 4 single blocks of 19 + 38 to fit the time: the JSON's notes say so) from ComfyUI's
classes with random weights, writes them as files and loads them through ComfyUI's own
diffusion-model loader, as loaded by default (``dynamic``: on ComfyUI 0.33+ with an NVIDIA GPU the
dynamic-VRAM ``ModelPatcherDynamic``, turned on in-process as ComfyUI's main.py does, see
``comfy_runtime.enable_dynamic_vram``) and with ``disable_dynamic`` (``non_dynamic``). Then, per
family, each section in :data:`SECTIONS` order:

- ``train``: T-LoRA training steps at 1024x1024 at the memory model's recipe (SDXL: T-LoRA rank 64,
  FLUX: Vanilla T-LoRA rank 32; AdamW, batch 1, gradient checkpointing) on both loads: seconds
  per step (median interval between optimizer steps), peak CUDA memory (every model unloaded
  first, so the peak is the run's own; see :func:`measured`), the ComfyUI training flags seen
  during the model calls, the adapters' largest difference between the two loads (the trainer
  trains a dynamic model on its non-dynamic delegate, so they agree up to GPU non-determinism),
  and ``bench/train_memory.py``'s predicted peak for the same model and settings beside the
  measured one (:func:`memory_model`);
- ``comfy_trainer``: ComfyUI's built-in ``TrainLoraNode`` (comfy_extras/nodes_train.py), run
  in-process on the same model, latent, prompt, rank, steps, learning rate, batch, AdamW, bf16
  compute and checkpointing, its adapters restricted to our target layers
  (:func:`only_wrapping`): s/step and peak beside ours, as ratios. Differences it does not let us
  remove: plain LoRA (no rank mask, no orthogonal init; ours has 2 x rank columns for T-LoRA),
  whole fused matrices (FLUX qkv / linear1) where ours may cover some rows, x0-space loss;
- ``loader_vs_stock``: sampling time of a rank-64 T-LoRA through the T-LoRA Loader (per-step rank
  mask) against the same file through ``LoraLoaderModelOnly`` (stock: merged weights), same
  sampler, steps and CFG, after one warm-up each (which loads / merges), on both loads: ratios;
- ``loader``: 4 Euler steps with the trained file applied by the T-LoRA Loader's patch on the
  dynamic and on the non-dynamic model: the sampler loop's seconds after one warm-up run (which
  loads) and the largest latent difference;
- ``train_on_dynamic_clone``: the training run forced onto a plain clone of the dynamic patcher
  (what the trainer avoids): whether it runs and how far it lands from the delegate's result.

Models are loaded inside ``torch.inference_mode()``, as ComfyUI runs its loader nodes, so the
non-dynamic load has inference-tensor weights as in real use (the trainer then copies each weight
per forward; see ``training.prepare``).

The time guard: before each section the script compares its estimate (the same section's time
for the previous family; ``FIRST_ESTIMATE_S`` for the first, 0 under ``--tiny``; the streaming
part's own: ``gpu_streaming.SETUP_ESTIMATE_S``, then its longest run so far) with what is left of
``--budget-s`` (default 480 s), less ``gpu_streaming.RESERVE_S`` kept for the streaming part while
the families run; a section that would not fit is skipped and recorded as such (a running section
is not cut short). The JSON is rewritten after every section, so a run that is killed still
leaves what it measured.

The allocator, as ComfyUI's main.py sets it on NVIDIA: PyTorch's cudaMallocAsync backend (chosen
when the script starts, before torch loads) and ``args.cuda_malloc`` True, so streamed casts get
fresh tensors; ``--disable-cuda-malloc`` runs everything with PyTorch's own allocator and
ComfyUI's reused cast buffers, as ComfyUI's flag of that name. The JSON's ``allocator`` says which.

    COMFYUI_ROOT=<a ComfyUI root> python bench/gpu_check.py    # one CUDA GPU (0.33+: dynamic VRAM)
    python bench/gpu_check.py --parts streaming                # the streaming part alone
    python bench/gpu_check.py --tiny                           # CPU, tiny models: the logic

``--tiny`` runs every section and every streaming run on tiny models on the CPU (no dynamic
patcher exists there; no CUDA memory figures; budgets as ``max_vram_gb``), so the test suite
checks the script itself. Writes
``bench/results/gpu_check.json`` (or ``--out``) and prints a short table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "tests", REPO / "bench"):   # the harness (it imports the pack itself), gpu_measure
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def _allocator_as_comfyui(argv: list[str]) -> None:
    """PyTorch's CUDA allocator as ComfyUI's main.py picks it on NVIDIA (its cuda_malloc.py):
    cudaMallocAsync, unless ``--disable-cuda-malloc`` or ``--tiny``. It must be chosen before torch
    loads, so this runs when the script is started, not when it is imported."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "--tiny" in argv or "--disable-cuda-malloc" in argv or "backend:" in conf:
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(filter(None, (conf, "backend:cudaMallocAsync")))


if __name__ == "__main__":
    _allocator_as_comfyui(sys.argv[1:])

import gpu_streaming  # noqa: E402
import torch  # noqa: E402
from gpu_measure import Budget, SamplerClock, StepClock, adapter_gap, measured, ratio, train_memory  # noqa: E402

import comfy_runtime  # noqa: E402

BUDGET_S = 480.0
FIRST_ESTIMATE_S = 60.0   # a section's estimate before any family has run it (GPU runs)
FLUX_BLOCKS = (2, 4)   # double, single blocks of the depth-reduced FLUX.1 (real: 19, 38)
SECTIONS = ("train", "comfy_trainer", "loader_vs_stock", "loader", "train_on_dynamic_clone")
PARTS = ("families", "streaming")


@dataclass(frozen=True)
class Spec:
    """One family's model and inputs for this check."""

    config: dict | None           # None: the tests' tiny config
    weight_dtype: torch.dtype
    compute_dtype: str            # T-LoRA Train's compute dtype ("auto": the model's)
    context_dim: int
    pooled_dim: int
    latent_side: int
    tokens: int
    loader_rank: int              # rank of the loader_vs_stock file
    train_rank: int | None        # None: the memory model's recipe rank
    note: str


FLUX_SHORT = {**comfy_runtime.REAL_FLUX_CONFIG, "depth": FLUX_BLOCKS[0], "depth_single_blocks": FLUX_BLOCKS[1]}
FULL = {
    "sdxl": Spec(comfy_runtime.REAL_SDXL_CONFIG, torch.bfloat16, "auto", 2048, 1280, 128, 77, 64, None,
                 "SDXL at real size (sd_xl_base_1.0's UNet config), bf16, random weights"),
    "flux": Spec(FLUX_SHORT, torch.float8_e4m3fn, "bf16", 4096, 768, 128, 512, 64, None,
                 f"FLUX.1 DEPTH-REDUCED to fit the time: {FLUX_BLOCKS[0]} double + {FLUX_BLOCKS[1]} single "
                 "blocks (real: 19 + 38) at real widths; fp8 e4m3fn storage, bf16 compute, random weights"),
}
TINY = {family: Spec(None, torch.float32, "auto", 32, 32, 8, 8, 8, 8, f"tiny {family} (tests), fp32, CPU")
        for family in ("sdxl", "flux")}


def memory_model(family: str, spec: Spec) -> dict:
    """``bench/train_memory.py``'s prediction for the run this check makes (its recipe at 1024 x 1024,
    checkpointing on, on ``spec``'s config: the real-size one also under ``--tiny``), and the
    recipe."""
    with train_memory() as tm:
        variant, rank, base_dtype, tokens = tm.RECIPES[family]
        peak = tm.predict(family, config=spec.config or FULL[family].config)["peak_gib"]
        context = tm.CONTEXT_OVERHEAD_GIB
    return {"variant": variant, "rank": rank, "base_dtype": str(base_dtype), "tokens": tokens,
            "peak_gib": peak, "peak_without_context_gib": peak - context}


# --- models ---------------------------------------------------------------------------------------

def _model_file(family: str, spec: Spec, folder: Path) -> Path:
    """A random-weight diffusion-model file of ``family`` (ComfyUI's own key names), drawn on the
    GPU when there is one."""
    import safetensors.torch

    shapes = comfy_runtime.build_model(family, spec.config, device="meta").diffusion_model.state_dict()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(0)
    tensors = {k: (0.02 * torch.randn(v.shape, generator=gen, device=device)).to(torch.bfloat16).cpu()
               for k, v in shapes.items()}
    path = folder / f"{family}.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    return path


def model_loader(family: str, spec: Spec, folder: Path):
    """``load(disable_dynamic) -> ModelPatcher`` through ComfyUI's own diffusion-model loader (the
    tiny shapes are not detectable: there the harness builds the model, with a loader factory)."""
    if spec.config is None:
        def load(disable_dynamic: bool = False):
            patcher = comfy_runtime.build_model(family, spec.config)
            patcher.cached_patcher_init = (lambda *a, disable_dynamic=False: load(True), ())
            return patcher
        return load
    import inspect

    import comfy.sd

    path = _model_file(family, spec, folder)
    options = {"dtype": spec.weight_dtype}   # explicit: ComfyUI would pick fp16 for SDXL on most GPUs
    dynamic_aware = "disable_dynamic" in inspect.signature(comfy.sd.load_diffusion_model).parameters

    def load(disable_dynamic: bool = False):
        kwargs = {"disable_dynamic": True} if disable_dynamic and dynamic_aware else {}
        return comfy.sd.load_diffusion_model(str(path), model_options=options, **kwargs)
    return load


def inputs(family: str, spec: Spec):
    """(LATENT, positive, negative) as nodes pass them (inference tensors)."""
    with torch.inference_mode():
        side = spec.latent_side
        latents = {"samples": torch.randn(comfy_runtime.latent_shape(family, 1, side),
                                          generator=torch.Generator().manual_seed(1))}
        conds = [comfy_runtime.fake_conditioning(family, seed=s, tokens=spec.tokens, context_dim=spec.context_dim,
                                                 pooled_dim=spec.pooled_dim) for s in (1, 2)]
    return latents, conds[0], conds[1]


def is_dynamic(patcher) -> bool:
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


# --- sections -------------------------------------------------------------------------------------

def train_run(patcher, family: str, spec: Spec, recipe: dict, steps: int) -> dict:
    """T-LoRA Train's loop on ``patcher`` at the recipe: figures, and the result under ``"result"``."""
    import train_helpers as th

    latents, positive, _ = inputs(family, spec)
    clock = StepClock(patcher)
    rank = spec.train_rank or recipe["rank"]
    from comfyui_tlora.tlora_core.schedule import default_min_rank

    with measured({}) as out, clock.counting():
        result = th.train(clock.patcher, latents, positive, variant=recipe["variant"], rank=rank,
                          min_rank=default_min_rank(rank), steps=steps, compute_dtype=spec.compute_dtype,
                          learning_rate=1e-4, gradient_checkpointing=True)
    return {**out, **clock.summary(), "variant": recipe["variant"], "rank": rank, "result": result}


@contextlib.contextmanager
def only_wrapping(keys: set[str], counts: dict):
    """Make ``ModelPatcher.add_weight_wrapper`` keep only ``keys`` while the block runs: ComfyUI's
    trainer creates an adapter for every layer and registers it there, so the dropped ones are
    never applied, get no gradient and stay where they were made (the offload device)."""
    import comfy.model_patcher

    cls = comfy.model_patcher.ModelPatcher
    original = cls.add_weight_wrapper
    counts.update(kept=0, dropped=0)

    def add_weight_wrapper(self, name, function):
        counts["kept" if name in keys else "dropped"] += 1
        if name in keys:
            original(self, name, function)

    cls.add_weight_wrapper = add_weight_wrapper
    try:
        yield
    finally:
        cls.add_weight_wrapper = original


def comfy_trainer(patcher, family: str, spec: Spec, rank: int, steps: int, layers: str) -> dict:
    """ComfyUI's ``TrainLoraNode`` on ``patcher`` (``layers``: ``"targets"`` = ours, ``"all"`` = as
    shipped), called as the executor calls it: every input a list, inside inference mode."""
    from comfy_extras.nodes_train import TrainLoraNode
    from comfyui_tlora.training.targets import find_targets

    latents, positive, _ = inputs(family, spec)
    values = {i.id: getattr(i, "default", None) for i in TrainLoraNode.define_schema().inputs}
    values.update(batch_size=1, steps=steps, grad_accumulation_steps=1, learning_rate=1e-4, rank=rank,
                  optimizer="AdamW", loss_function="MSE", seed=0, training_dtype="bf16", lora_dtype="fp32",
                  gradient_checkpointing=True, existing_lora="[None]")
    clock = StepClock(patcher)
    values["model"] = clock.patcher
    kwargs = {name: [value] for name, value in values.items()}
    # 0.3.75's node fails on one LATENT (``multi_res`` unbound): two copies of the same latent.
    kwargs["latents"], kwargs["positive"] = [latents, latents], [positive]
    keys = {f"diffusion_model.{t.module}.weight" for t in find_targets(patcher.model.diffusion_model, family)}
    counts: dict = {}
    wrapping = only_wrapping(keys, counts) if layers == "targets" else contextlib.nullcontext()
    with measured({}) as out, wrapping, clock.counting(), torch.inference_mode():
        TrainLoraNode.execute(**kwargs)
    return {**out, **clock.summary(), "layers": layers, "adapters": counts or None, "rank": rank,
            "settings": {k: values[k] for k in ("training_dtype", "lora_dtype", "optimizer", "algorithm",
                                                "gradient_checkpointing", "batch_size")}}


def loader_vs_stock(loads: dict, family: str, spec: Spec, folder: Path, steps: int, trained=None,
                    repeats: int = 2) -> dict:
    """A rank-``spec.loader_rank`` T-LoRA file (``trained`` if it is one, else the initialisation of
    one on our targets) sampled through the T-LoRA Loader and through ``LoraLoaderModelOnly``
    (stock: weights merged at load; a dynamic patcher applies them as it streams each weight), on
    each of ``loads`` (name -> patcher), round robin after one warm-up each (which loads and
    merges); each condition's fastest sampler loop."""
    import folder_paths
    import nodes
    from comfyui_tlora.nodes import loader as loader_tools
    from comfyui_tlora.nodes.loader import AUTO_MIN_RANK, TLoRALoader
    from comfyui_tlora.tlora_core.files.write import save_tlora
    from comfyui_tlora.tlora_core.inventory import inventory_from_module
    from comfyui_tlora.tlora_core.schedule import default_min_rank
    from comfyui_tlora.training import loop, modules
    from comfyui_tlora.training.targets import find_targets

    rank = spec.loader_rank
    dm = next(iter(loads.values())).model.diffusion_model
    config = loop.TrainConfig(variant="tlora", rank=rank, min_rank=default_min_rank(rank))
    if trained is None or trained.variant != "tlora" or loader_tools.schedule_ranks(trained) != {rank}:
        trained = loop.build_weights(modules.AdapterSet(find_targets(dm, family), "tlora", rank, seed=0),
                                     config, family)
        source = "initialisation"
    else:
        source = "trained"
    name = f"gpu_check_{family}_r{rank}.safetensors"
    save_tlora(folder / name, trained, inventory=inventory_from_module(dm))
    saved = folder_paths.folder_names_and_paths.get("loras")
    folder_paths.folder_names_and_paths["loras"] = ([str(folder)], folder_paths.supported_pt_extensions)
    models = {}
    try:
        with torch.inference_mode():
            for load, patcher in loads.items():
                models[f"{load}:tlora"] = TLoRALoader.execute(
                    model=patcher, lora_name=name, strength_model=1.0, min_rank=AUTO_MIN_RANK,
                    schedule_power=0.0, schedule_ordinary_lora=False).result[0]
                models[f"{load}:stock"] = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, name, 1.0)[0]
    finally:
        if saved is None:
            folder_paths.folder_names_and_paths.pop("loras", None)
        else:
            folder_paths.folder_names_and_paths["loras"] = saved
    clocks = {k: SamplerClock(m) for k, m in models.items()}
    _, positive, negative = inputs(family, spec)
    times: dict[str, list[float]] = {k: [] for k in models}
    with measured({}) as out:
        for rep in range(repeats + 1):
            for key, model in models.items():
                with torch.inference_mode():
                    comfy_runtime.sample(model, family, steps=steps, seed=3, size=spec.latent_side, cfg=2.0,
                                         positive=positive, negative=negative)
                if rep:   # the first round loads, merges and warms up
                    times[key].append(clocks[key].seconds)
    best = {k: min(v) for k, v in times.items()}
    per_load = {load: {"dynamic_patcher": is_dynamic(patcher), "tlora_s": best[f"{load}:tlora"],
                       "stock_s": best[f"{load}:stock"],
                       "tlora/stock": ratio(best[f"{load}:tlora"], best[f"{load}:stock"])}
                for load, patcher in loads.items()}
    return {**out, "rank": rank, "min_rank": config.min_rank, "adapter": source, "steps": steps,
            "sampler": "euler", "cfg": 2.0, **per_load, "all_s": times}


def sample_with(patcher, family: str, spec: Spec, weights) -> tuple[torch.Tensor, float]:
    """The latent of 4 Euler steps with ``weights`` installed by the Loader's patch, and the sampler
    loop's seconds on the second run (the first loads the model and warms up)."""
    from comfyui_tlora.nodes import patch

    model = patcher.clone()
    patch.install(model, weights)
    clock = SamplerClock(model)
    _, positive, negative = inputs(family, spec)
    for _ in range(2):
        with torch.inference_mode():
            latent = comfy_runtime.sample(model, family, steps=4, seed=3, size=spec.latent_side, cfg=2.0,
                                          positive=positive, negative=negative)
    return latent, clock.seconds


# --- the run --------------------------------------------------------------------------------------

def check_family(out: dict, family: str, spec: Spec, steps: int, folder: Path, budget: Budget, save) -> None:
    """Every section for ``family`` into ``out``; ``save()`` is called after each."""
    from comfyui_tlora.training import prepare

    out["model"] = spec.note
    models: dict = {}

    def setup() -> dict:
        load = model_loader(family, spec, folder)
        with torch.inference_mode():   # as ComfyUI runs a loader node
            models.update(load=load, dynamic=load(), plain=load(disable_dynamic=True))
        return {"dynamic_patcher": is_dynamic(models["dynamic"]),
                "params": sum(p.numel() for p in models["plain"].model.diffusion_model.parameters())}

    budget.run(out, family, "setup", setup)
    save()
    if out["setup"]["status"] != "ran":
        return
    runs: dict = {}

    def train() -> dict:
        model = memory_model(family, spec)
        if spec.config is not None and (model["base_dtype"], model["tokens"]) != (str(spec.weight_dtype), spec.tokens):
            raise ValueError(f"train_memory's {family} recipe ({model['base_dtype']}, {model['tokens']} tokens) "
                             f"is not this check's ({spec.weight_dtype}, {spec.tokens} tokens): align FULL")
        recipe = {"variant": model["variant"], "rank": model["rank"]}
        runs["dynamic"] = train_run(models["dynamic"], family, spec, recipe, steps)
        runs["non_dynamic"] = train_run(models["plain"], family, spec, recipe, steps)
        figures = {name: {k: v for k, v in run.items() if k != "result"} for name, run in runs.items()}
        measured_peak = figures["dynamic"]["peak_allocated_gib"]
        return {**figures, "adapter_max_diff": adapter_gap(runs["dynamic"]["result"], runs["non_dynamic"]["result"]),
                "memory_model": {**model, "measured_peak_allocated_gib": measured_peak,
                                 "measured/model": ratio(measured_peak, model["peak_without_context_gib"]),
                                 "compared": "peak allocated vs the model without its CUDA-context estimate"}}

    def comfy() -> dict:
        ours = out["train"]["dynamic"]
        rank = ours["rank"]
        try:
            theirs = comfy_trainer(models["dynamic"], family, spec, rank, steps, "targets")
        except Exception as err:  # ComfyUI's trainer on our layers only; then as shipped, for context
            first = f"{type(err).__name__}: {err}"[:300]
            try:
                theirs = {"targets_error": first, **comfy_trainer(models["dynamic"], family, spec, rank, steps, "all")}
            except Exception as again:
                raise RuntimeError(f"on our layers: {first}; as shipped: {type(again).__name__}: {again}") from again
        return {**theirs, "comfy/ours": {
            "s_per_step": ratio(theirs["s_per_step"], ours["s_per_step"]),
            "peak_allocated": ratio(theirs["peak_allocated_gib"], ours["peak_allocated_gib"])}}

    def loader() -> dict:
        weights = runs["non_dynamic"]["result"].weights
        got, got_s = sample_with(models["dynamic"], family, spec, weights)
        want, want_s = sample_with(models["plain"], family, spec, weights)
        return {"dynamic_s": got_s, "non_dynamic_s": want_s,
                "latent_max_diff": float((got.float() - want.float()).abs().max())}

    def forced_clone() -> dict:
        real_clone = prepare._training_clone
        prepare._training_clone = lambda patcher: patcher.clone()
        try:
            forced = train_run(models["dynamic"], family, spec, {"variant": runs["dynamic"]["variant"],
                                                                  "rank": runs["dynamic"]["rank"]}, steps)
            return {"ran": True, "adapter_max_diff": adapter_gap(forced["result"], runs["non_dynamic"]["result"])}
        except Exception as err:  # the diagnostic: what a trainer without the delegate would hit
            return {"ran": False, "error": f"{type(err).__name__}: {err}"[:300]}
        finally:
            prepare._training_clone = real_clone

    sections = {"train": train, "comfy_trainer": comfy,
                "loader_vs_stock": lambda: loader_vs_stock(
                    {"dynamic": models["dynamic"], "non_dynamic": models["plain"]}, family, spec, folder,
                    steps=4 if spec.config is None else 10,
                    trained=runs["non_dynamic"]["result"].weights if "non_dynamic" in runs else None),
                "loader": loader, "train_on_dynamic_clone": forced_clone}
    for name in SECTIONS:
        needs_train = name not in ("train", "loader_vs_stock")
        if needs_train and out.get("train", {}).get("status") != "ran":
            out[name] = {"status": "skipped", "note": "skipped: needs the train section"}
        else:
            budget.run(out, family, name, sections[name])
        save()


def table(report: dict) -> str:
    def f(value, fmt):
        return format("-", ">" + fmt.split(".")[0]) if value is None else format(value, fmt)

    head = (f"{'family':6} {'dyn':5} {'s/step':>7} {'peak GiB':>8} {'model GiB':>9} {'comfy/ours s':>12} "
            f"{'comfy/ours GiB':>14} {'tlora/stock':>12} {'adapter diff':>12} {'loader diff':>11}  skipped")
    lines = [head]
    for family, r in report["families"].items():
        def get(section, *keys, r=r):
            value = r.get(section, {})
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            return value
        skipped = [n for n in ("setup", *SECTIONS) if r.get(n, {}).get("status") != "ran"]
        if get("comfy_trainer", "layers") == "all":
            skipped.append("comfy_trainer on our layers (ran on all layers)")
        lines.append(
            f"{family:6} {str(get('setup', 'dynamic_patcher')):5} {f(get('train', 'dynamic', 's_per_step'), '7.3f')} "
            f"{f(get('train', 'dynamic', 'peak_allocated_gib'), '8.1f')} "
            f"{f(get('train', 'memory_model', 'peak_without_context_gib'), '9.1f')} "
            f"{f(get('comfy_trainer', 'comfy/ours', 's_per_step'), '11.2f')}x "
            f"{f(get('comfy_trainer', 'comfy/ours', 'peak_allocated'), '13.2f')}x "
            f"{f(get('loader_vs_stock', 'dynamic', 'tlora/stock'), '11.2f')}x "
            f"{f(get('train', 'adapter_max_diff'), '12.2e')} {f(get('loader', 'latent_max_diff'), '11.2e')}  "
            f"{','.join(skipped) or '-'}")
    if "streaming" in report:
        lines += gpu_streaming.table(report["streaming"])
    lines.append(f"budget {report['budget']['limit_s']:.0f} s, used {report['budget']['used_s']:.0f} s; "
                 + "; ".join(report["notes"]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny models: check the script's logic")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 6, tiny 3)")
    parser.add_argument("--family", nargs="+", default=["sdxl", "flux"], choices=["sdxl", "flux"])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="the families' sections, the streaming part (default: both)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="time guard for the whole run")
    parser.add_argument("--disable-cuda-malloc", action="store_true",
                        help="PyTorch's own allocator and ComfyUI's cast buffers throughout, as ComfyUI's flag")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny on a CPU")
    budget = Budget(args.budget_s, first_estimate_s=0.0 if args.tiny else FIRST_ESTIMATE_S)
    comfy_runtime.bootstrap(cpu=args.tiny)
    import comfy.cli_args
    import comfy.model_management as mm

    cuda = torch.cuda.is_available() and not args.tiny
    allocator = torch.cuda.get_allocator_backend() if cuda else None
    # ComfyUI's main.py sets this beside the allocator: streamed casts get fresh tensors with it, a
    # reused per-stream buffer without (ops.cast_bias_weight).
    comfy.cli_args.args.cuda_malloc = allocator == "cudaMallocAsync"
    specs = TINY if args.tiny else FULL
    steps = args.steps or (3 if args.tiny else 6)
    notes = [*(specs[f].note for f in args.family if "families" in args.parts),
             *([gpu_streaming.note(args.tiny)] if "streaming" in args.parts else []),
             f"dynamic VRAM {comfy_runtime.DYNAMIC_VRAM}"]
    report = {"comfyui": comfy_runtime.comfyui_version(), "tiny": args.tiny, "device": str(mm.get_torch_device()),
              "dynamic_vram": comfy_runtime.DYNAMIC_VRAM,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "torch": torch.__version__,
              "allocator": {"torch": allocator, "comfy_cuda_malloc": comfy.cli_args.args.cuda_malloc},
              "notes": notes,
              "budget": {"limit_s": args.budget_s, "used_s": 0.0, "skipped": budget.skipped}, "families": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["budget"]["used_s"] = budget.used()
        args.out.write_text(json.dumps(report, indent=2, default=str))

    with tempfile.TemporaryDirectory() as folder:
        if "families" in args.parts:
            if "streaming" in args.parts and not args.tiny:
                budget.reserved_s = gpu_streaming.RESERVE_S
            for family in args.family:
                check_family(report["families"].setdefault(family, {}), family, specs[family], steps,
                             Path(folder), budget, save)
            budget.reserved_s = 0.0
        if "streaming" in args.parts:
            latents, positive, _ = inputs("flux", specs["flux"])
            gpu_streaming.check(report.setdefault("streaming", {}), tiny=args.tiny, steps=steps,
                                folder=Path(folder) / "streaming", latents=latents, positive=positive,
                                budget=budget, save=save)
    sys.stdout.write(table(report))
    return report


if __name__ == "__main__":
    main()
