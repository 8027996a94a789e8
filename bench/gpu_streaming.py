"""The GPU check's streaming part: T-LoRA Train on FLUX.1 when its weights do not all fit.

Model: FLUX.1 at real widths (3072 hidden, 4096 context), DEPTH-REDUCED to :data:`BLOCKS` (6 double
+ 12 single of 19 + 38: 7.1 GiB in bf16) so that the part fits the check's time, random weights,
written as files and loaded by ComfyUI's own loaders under inference mode as its loader nodes run:
the bf16 file (``load_diffusion_model``, non-dynamic: T-LoRA Train trains a dynamic model's
non-dynamic copy anyway), the same weights as an fp8-scaled file (``_quantization_metadata``
header, ``tests/quantized_files.write_mixed_precision``) and as a GGUF Q8_0 file
(``write_gguf``, loaded by ComfyUI-GGUF's ``UnetLoaderGGUF`` when it is provisioned).

Budgets. A budget B (24, 16, 12 GiB) is a card on which ComfyUI sees B GiB free. On full FLUX.1
(22.2 GiB of bf16 weights, ``M_full``) a run needs a working set ``W_full`` beside its weights
(``bench/train_memory.py``'s prediction at the recipe, 1024 x 1024), so a fraction
``f = (B - W_full) / M_full`` of the weights fits. The depth-reduced model of ``M`` bytes gets the
budget ``W + f * M`` (``M``: its weights in bf16, 2 bytes a parameter, as ``M_full``): the same
fraction of its weights fits beside its own working set ``W`` (on a GPU: the full-load run's peak
minus its weights, measured; on a CPU: the trainer's own working set). A quantized base gets the
same room for weights beside its own ``W``, which holds more of its smaller weights. On a GPU the budget is
made with ballast (device memory held so that ComfyUI's ``get_free_memory`` is the budget) and
T-LoRA Train runs with ``max_vram_gb`` 0 (automatic), as a user on such a card; on a CPU, where
ComfyUI always loads fully, the budget is ``max_vram_gb`` (the trainer trims the load with
ComfyUI's ``partially_unload``), so ``--tiny`` runs the same streaming code path.

Runs, each under the check's time guard, in :data:`RUNS` order: T-LoRA Train at the FLUX recipe
(Vanilla T-LoRA rank 32, AdamW, bf16 compute, checkpointing) on a full load twice (the second is
the run-to-run baseline), at each budget, at 12 GiB with ComfyUI's reused cast buffers
(``args.cuda_malloc`` False, as with ``--disable-cuda-malloc``: ``ops.cast_bias_weight`` then
casts streamed weights into a per-stream buffer it reuses; ComfyUI 0.33+), the floor (the bare
frozen model's forward and backward to the input latent, no adapters, the same checkpointing and
load: what any trainer pays) on a full load and at 12 GiB, and the fp8-scaled and GGUF bases on a
full load and at 12 GiB. Per run: s/step (median interval between steps), what ComfyUI saw free
when the trainer loaded, resident and streamed weights, bytes streamed per step (counted: every
forward call of a layer ComfyUI left streaming adds its stored bytes, ``module_size``; expected:
twice a streamed layer's bytes inside a checkpointed block, forward and recomputation, once
outside), peak allocated (PyTorch's allocator, the ballast taken out) against the budget, the
adapters' largest difference from the full load's (against the full-vs-full baseline), and the
T-LoRA step over the floor's.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from gpu_measure import GIB, StepClock, adapter_gap, ballast, measured, ratio, train_memory

import comfy_runtime

FAMILY = "flux"
BLOCKS = (6, 12)            # double, single blocks of the depth-reduced FLUX.1 (real: 19, 38)
BUDGETS_GIB = (24, 16, 12)  # the cards: ComfyUI sees this much free
STREAMED_BUDGET = 12        # the budget of the cast-buffer, floor and quantized runs
GGUF_TYPE = "Q8_0"
SETUP_ESTIMATE_S = 60.0     # GPU: writing the three files and loading them
RUN_ESTIMATE_S = 20.0       # GPU: a run before any has been timed (loads and steps the 7 GiB model)
RESERVE_S = 180.0           # GPU: kept for this part while the families run (setup + 12 runs)


@dataclass(frozen=True)
class Run:
    """One run of this part."""

    base: str                     # "float" (bf16 on a GPU), "fp8_scaled", "gguf"
    budget: int | None = None     # a card of this many GiB, None: a full load on the whole device
    floor: bool = False           # the bare frozen model's step instead of T-LoRA Train's
    reused_buffers: bool = False  # ComfyUI's cast-buffer path (args.cuda_malloc False)
    compare: str | None = None    # the full-load run whose adapters this one's are compared to
    pair: str | None = None       # floor: the T-LoRA run with the same load


HOW = {
    "streamed_per_step_gib": "counted: every forward call of a layer ComfyUI left streaming adds its stored bytes "
                             "(module_size), per optimizer step; expected: each streamed layer's bytes twice inside a "
                             "checkpointed block (forward and recomputation), once outside",
    "peak_allocated_gib": "PyTorch's allocator peak during the run, the ballast and what was allocated before it "
                          "taken out",
    "budget_gib": "what ComfyUI is made to see free (GPU: ballast, T-LoRA Train automatic) or max_vram_gb (CPU); "
                  "scaled to this model, see setup and budgets",
    "adapters_vs": "largest absolute difference of every adapter factor from the named full-load run; "
                   "baseline_adapter_max_diff: full_again against full",
    "tlora/floor": "the T-LoRA run's s/step over the bare frozen model's forward + backward to the input, same load",
    "automatic": "present when the automatic run ran out of device memory: the run was repeated with max_vram_gb "
                 "leaving training.memory's working set free (max_vram_gb says what)",
}
"""What the part's figures are (written into the JSON)."""

FULL_LOAD = {"float": "full", "fp8_scaled": "fp8_scaled_full", "gguf": "gguf_full"}
"""Each base's full-load T-LoRA run: its budgets come from it."""

RUNS: dict[str, Run] = {
    "full": Run("float"),
    "full_again": Run("float", compare="full"),
    **{f"budget_{b}": Run("float", b, compare="full") for b in BUDGETS_GIB},
    f"budget_{STREAMED_BUDGET}_reused_buffers": Run("float", STREAMED_BUDGET, reused_buffers=True, compare="full"),
    "floor_full": Run("float", floor=True, pair="full"),
    f"floor_budget_{STREAMED_BUDGET}": Run("float", STREAMED_BUDGET, floor=True, pair=f"budget_{STREAMED_BUDGET}"),
    "fp8_scaled_full": Run("fp8_scaled"),
    f"fp8_scaled_budget_{STREAMED_BUDGET}": Run("fp8_scaled", STREAMED_BUDGET, compare="fp8_scaled_full"),
    "gguf_full": Run("gguf"),
    f"gguf_budget_{STREAMED_BUDGET}": Run("gguf", STREAMED_BUDGET, compare="gguf_full"),
}


def config(tiny: bool) -> dict:
    """The FLUX.1 config: real widths at :data:`BLOCKS`, or the quantized fixtures' tiny one (128-wide
    heads, which ComfyUI 0.33's detection reads) with two blocks of each kind."""
    if tiny:
        import quantized_models

        return {**quantized_models.fixture_config(FAMILY), "depth": 2, "depth_single_blocks": 2}
    return {**comfy_runtime.REAL_FLUX_CONFIG, "depth": BLOCKS[0], "depth_single_blocks": BLOCKS[1]}


def note(tiny: bool) -> str:
    if tiny:
        return "streaming: tiny FLUX (the quantized fixtures' config, 2 + 2 blocks), fp32, CPU, budgets as max_vram_gb"
    return (f"streaming: FLUX.1 DEPTH-REDUCED to {BLOCKS[0]} double + {BLOCKS[1]} single blocks (real: 19 + 38) "
            f"at real widths, bf16 / fp8 scaled / GGUF {GGUF_TYPE}, random weights; budgets {BUDGETS_GIB} GiB "
            "SCALED to the model: W + f*M with f = (B - W_full) / M_full the fraction of full FLUX.1's bf16 "
            "weights that fits on a B GiB card (see streaming.setup), made with ballast")


# --- the bases -------------------------------------------------------------------------------------

def random_weights(cfg: dict, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random-weight FLUX state dict (ComfyUI's key names), drawn on the GPU when there is one."""
    shapes = comfy_runtime.build_model(FAMILY, cfg, device="meta").diffusion_model.state_dict()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(seed)
    return {k: (0.02 * torch.randn(v.shape, generator=gen, device=device)).to(dtype) for k, v in shapes.items()}


@contextlib.contextmanager
def threaded_gguf_quantize(threads: int | None = None):
    """gguf-py's ``quantize`` on row slices in threads for the block (its numpy work releases the
    GIL; GGML blocks never cross a row, so the slices' bytes concatenate to the whole's)."""
    import gguf.quants
    import numpy as np

    real = gguf.quants.quantize
    threads = threads or os.cpu_count() or 1

    def quantize(data, qtype):
        if data.ndim < 2 or threads < 2 or data.shape[0] < 2 * threads:
            return real(data, qtype)
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(lambda part: real(part, qtype), np.array_split(data, threads, axis=0)))
        return np.concatenate(parts, axis=0)

    gguf.quants.quantize = quantize
    try:
        yield
    finally:
        gguf.quants.quantize = real


def _register(folder: Path) -> None:
    """``folder`` as one of ComfyUI's diffusion-model folders (the GGUF loader looks files up by name)."""
    import folder_paths

    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    for key in ("diffusion_models", "unet", "unet_gguf"):
        folder_paths.filename_list_cache.pop(key, None)


def _detection(cfg: dict, tiny: bool):
    """ComfyUI's model detection as is, or (tiny shapes on a ComfyUI that cannot read them) the
    quantized fixtures' stand-in that answers with ``cfg``."""
    import quantized_models

    detected = comfy_runtime.comfyui_version() in quantized_models.FAMILIES[FAMILY].detected_on
    if not tiny or detected:
        return contextlib.nullcontext()
    return quantized_models._detection(FAMILY, cfg, detected)


def write_bases(cfg: dict, storage: torch.dtype, folder: Path, gguf: bool, seconds: dict) -> dict[str, Path]:
    """The float file and the same weights as fp8 scaled and (``gguf``) GGUF files; each file's
    writing time into ``seconds``."""
    import quantized_files
    import quantized_models
    import safetensors.torch

    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sd = random_weights(cfg, storage)
    paths = {"float": folder / "flux_float.safetensors", "fp8_scaled": folder / "flux_fp8_scaled.safetensors"}
    safetensors.torch.save_file({k: v.cpu() for k, v in sd.items()}, str(paths["float"]))
    seconds["float"] = time.perf_counter() - start
    linears = quantized_models.quantizable_linears(comfy_runtime.build_model(FAMILY, cfg, device="meta").diffusion_model)
    start = time.perf_counter()
    quantized_files.write_mixed_precision(sd, linears, "float8_e4m3fn", "header", paths["fp8_scaled"])
    seconds["fp8_scaled"] = time.perf_counter() - start
    if gguf:
        paths["gguf"] = folder / "flux_gguf.gguf"
        start = time.perf_counter()
        with threaded_gguf_quantize():
            quantized_files.write_gguf({k: v.cpu() for k, v in sd.items()}, linears, GGUF_TYPE, FAMILY, paths["gguf"])
        seconds["gguf"] = time.perf_counter() - start
    return paths


def load_base(base: str, path: Path, cfg: dict, storage: torch.dtype, tiny: bool):
    """The ModelPatcher of ``path`` from ComfyUI's loader (GGUF: ComfyUI-GGUF's node), under inference mode."""
    import inspect

    import comfy.sd

    with torch.inference_mode(), _detection(cfg, tiny):
        if base == "gguf":
            import quantized_models

            _register(path.parent)
            return quantized_models.gguf_loader_class()().load_unet(path.name)[0]
        kwargs = {"disable_dynamic": True} if "disable_dynamic" in inspect.signature(
            comfy.sd.load_diffusion_model).parameters else {}
        options = {"dtype": storage} if base == "float" else {}   # fp8 scaled: the file says
        return comfy.sd.load_diffusion_model(str(path), model_options=options, **kwargs)


def budget_fractions() -> dict:
    """``f`` per budget from train_memory's prediction for full FLUX.1 in bf16 (module docstring)."""
    with train_memory() as tm:
        p = tm.predict(FAMILY, base_dtype=torch.bfloat16, config=comfy_runtime.REAL_FLUX_CONFIG)
    working = p["peak_gib"] - p["base_gib"] - p["context_gib"]
    return {"full_flux_weights_gib": p["base_gib"], "full_flux_working_set_gib": working,
            "fraction_resident": {str(b): max(0.0, (b - working) / p["base_gib"]) for b in BUDGETS_GIB}}


# --- what a run does with the device --------------------------------------------------------------

def _layers(dm: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """ComfyUI's cast layers that hold a weight (what ComfyUI keeps resident or streams)."""
    return {name: m for name, m in dm.named_modules()
            if hasattr(m, "weight_function") and hasattr(m, "bias_function")
            and isinstance(getattr(m, "weight", None), torch.Tensor)}


def streamed_per_step(patcher) -> int:
    """Bytes streamed per training step by the load just made: each streamed layer's stored bytes,
    twice inside a checkpointed block (forward and recomputation), once outside."""
    import comfy.model_management as mm
    from comfyui_tlora.tlora_core import families
    from comfyui_tlora.training import prepare

    dm = patcher.model.diffusion_model
    blocks = tuple(f"{name}." for name in prepare.checkpoint_blocks(dm, families.recognise(patcher.model).checkpoint_blocks))
    return sum(mm.module_size(m) * (2 if name.startswith(blocks) else 1)
               for name, m in _layers(dm).items() if prepare.streams(m))


def memory_estimate(patcher, setting: dict) -> int | None:
    """``training.memory.working_set``'s bytes for the run ``setting`` describes on the load just
    made (its streamed layers), None where the pack has no such estimate."""
    try:
        from comfyui_tlora.training import memory, optim
    except ImportError:
        return None
    from comfyui_tlora.tlora_core import families
    from comfyui_tlora.training import prepare
    from comfyui_tlora.training.targets import find_targets

    dm = patcher.model.diffusion_model
    family = families.recognise(patcher.model)
    streamed = {name: m for name, m in _layers(dm).items() if prepare.streams(m)}
    return memory.working_set(
        dm, family, find_targets(dm, family), variant=setting["variant"], rank=setting["rank"],
        optimizer_copies=optim.STATE_COPIES["AdamW"], latent_shape=setting["latent_shape"],
        context_tokens=setting["context_tokens"], compute_dtype=setting["compute_dtype"],
        checkpointing=True, streamed=streamed).total


@contextlib.contextmanager
def watching_loads(seen: list[dict], setting: dict):
    """Every load T-LoRA Train makes in the block (``LoadPlan.load``): what ComfyUI saw free just
    before, the plan, the residency, the expected bytes per step and ``training.memory``'s working
    set for it (:func:`memory_estimate` of ``setting``)."""
    import comfy.model_management as mm
    from comfyui_tlora.training import prepare

    real = prepare.LoadPlan.load

    def load(plan, patcher):
        free = mm.get_free_memory(patcher.load_device)
        where = real(plan, patcher)
        seen.append({"comfy_free": free, "plan": plan, "where": where, "per_step": streamed_per_step(patcher),
                     "estimate": memory_estimate(patcher, setting)})
        return where

    prepare.LoadPlan.load = load
    try:
        yield seen
    finally:
        prepare.LoadPlan.load = real


@contextlib.contextmanager
def counting_streamed(dm: torch.nn.Module, counts: dict):
    """``counts["bytes"]``: the stored bytes of every layer call made while ComfyUI streams the layer."""
    import comfy.model_management as mm
    from comfyui_tlora.training import prepare

    counts.update(bytes=0, calls=0)
    sizes = {id(m): mm.module_size(m) for m in _layers(dm).values()}

    def hook(module, args) -> None:
        if prepare.streams(module):
            counts["bytes"] += sizes[id(module)]
            counts["calls"] += 1

    handles = [m.register_forward_pre_hook(hook) for m in _layers(dm).values()]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def cast_path(reused_buffers: bool, counts: dict):
    """ComfyUI's cast path for the block: its reused per-stream cast buffers (``args.cuda_malloc``
    False) or fresh tensors (as the process runs); ``counts["cast_buffer_calls"]``: how often
    ComfyUI took a cast buffer (None: this ComfyUI has none). Afterwards the buffers are let go,
    as ComfyUI's executor does after every node (``reset_cast_buffers``)."""
    import comfy.cli_args
    import comfy.model_management as mm

    args = comfy.cli_args.args
    saved = args.cuda_malloc
    real = getattr(mm, "get_cast_buffer", None)
    counts["cast_buffer_calls"] = None if real is None else 0

    def get_cast_buffer(*a, **k):
        counts["cast_buffer_calls"] += 1
        return real(*a, **k)

    if reused_buffers:
        args.cuda_malloc = False
    if real is not None:
        mm.get_cast_buffer = get_cast_buffer
    try:
        yield counts
    finally:
        args.cuda_malloc = saved
        if real is not None:
            mm.get_cast_buffer = real
        if hasattr(mm, "reset_cast_buffers"):
            mm.reset_cast_buffers()


def floor_steps(patcher, latents, positive, steps: int, compute_dtype: str, memory_required: int,
                max_vram_bytes: int, clock: StepClock) -> None:
    """The bare frozen model's training step ``steps`` times: T-LoRA Train's load (same plan), noise,
    forward and loss, backward to the input latent only (no adapters, no optimizer), each stamped
    on ``clock``."""
    import train_helpers as th
    from comfyui_tlora.training import loop, objective, prepare

    data = th.training_data(patcher, latents, positive)
    with torch.inference_mode(False), torch.enable_grad(), prepare.trainable_model(
            patcher, gradient_checkpointing=True, compute_dtype=loop.COMPUTE_DTYPES[compute_dtype],
            memory_required=memory_required, max_vram_bytes=max_vram_bytes) as tp:
        predictor, device, ms = objective.NativePredictor(tp), tp.load_device, tp.model.model_sampling
        for step in range(steps):
            gen = loop.step_generator(0, step)
            x0, conds, weights = data.batch([0], device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            sigma, _ = objective.draw_noise_levels(ms, 1, gen)
            x_t, target = objective.noisy_input_and_target(ms, x0, noise, sigma.to(device))
            x_t = x_t.detach().requires_grad_(True)
            objective.weighted_mse(predictor(x_t, sigma.to(device), conds), target, weights).backward()
            clock.stamp()


def _loaded(loads: list[dict]) -> str:
    """The first load of a run in words (for a run that failed after it)."""
    if not loads:
        return "before loading"
    first = loads[0]
    return (f"ComfyUI saw {first['comfy_free'] / GIB:.2f} GiB free, the trainer asked "
            f"{first['plan'].memory_required / GIB:.2f} GiB for its working set; {first['where'].describe()}")


def one_run(patcher, run: Run, latents, positive, setting: dict, steps: int, budget: int | None,
            memory_required: int = 0, cap: int | None = None, loads: list | None = None) -> dict:
    """One run of ``run``'s kind on ``patcher`` within ``budget`` bytes (None: the whole device) at
    ``setting`` (recipe, compute dtype, inputs' shapes): its figures, and the training result under
    ``"result"`` (T-LoRA runs). ``cap``: max_vram_gb's bytes (default: 0 on a GPU, the budget on a
    CPU). ``loads`` collects the trainer's loads (:func:`watching_loads`). A failure (out of
    memory) is raised with what ComfyUI saw and loaded first. ``peak_allocated_gib`` is the run's
    own: the ballast and what was allocated before the run are taken out."""
    import train_helpers as th

    cuda = torch.cuda.is_available()
    if cap is None:
        cap = 0 if cuda or budget is None else budget   # a CPU's budget is the trainer's cap
    loads = [] if loads is None else loads
    clock, counts, out, held = StepClock(patcher), {}, {}, [0]
    result = None
    try:
        with measured(out), ballast(budget if cuda else None) as size, watching_loads(loads, setting), \
                cast_path(run.reused_buffers, counts), counting_streamed(patcher.model.diffusion_model, counts):
            held[0] = size
            if run.floor:
                floor_steps(clock.patcher, latents, positive, steps, setting["compute"], memory_required, cap, clock)
            else:
                with clock.counting():
                    result = th.train(clock.patcher, latents, positive, variant=setting["variant"],
                                      rank=setting["rank"], min_rank=setting["min_rank"], steps=steps,
                                      compute_dtype=setting["compute"], learning_rate=1e-4,
                                      gradient_checkpointing=True, max_vram_gb=cap / GIB)
    except Exception as err:
        peak = "" if out.get("peak_allocated_gib") is None else \
            f", peak allocated {out['peak_allocated_gib'] - held[0] / GIB:.2f} GiB"
        raise RuntimeError(f"[{_loaded(loads)}{peak}] {type(err).__name__}: {err}") from err
    summary = clock.summary()
    before = out.get("allocated_before_gib") or 0.0
    for record, key, other in ((out, "peak_allocated_gib", before), (out, "peak_reserved_gib", 0.0),
                               (summary, "device_used_at_steps_max_gib", 0.0)):
        if record.get(key) is not None:
            record[key] -= held[0] / GIB + other   # the run's own: no ballast, nothing from before
    first = loads[0]
    where = first["where"]
    peak = out.get("peak_allocated_gib")
    return {**out, **summary, "kind": "floor" if run.floor else "tlora", "base": run.base,
            "budget_gib": None if budget is None else budget / GIB,
            "budget_by": None if budget is None else "ballast" if cuda else "max_vram_gb",
            "ballast_gib": held[0] / GIB, "comfy_free_gib": first["comfy_free"] / GIB, "loads": len(loads),
            "max_vram_gb": cap / GIB, "trainer_working_set_gib": first["plan"].memory_required / GIB,
            "memory_model_working_set_gib": None if first["estimate"] is None else first["estimate"] / GIB,
            "measured_working_set_gib": None if peak is None else peak - where.resident_bytes / GIB,
            "resident_gib": where.resident_bytes / GIB, "streamed_gib": where.streamed_bytes / GIB,
            "streamed_layers": where.streamed_layers, "layers": where.layers,
            "streamed_per_step_gib": {"counted": counts["bytes"] / steps / GIB, "expected": first["per_step"] / GIB},
            "cast_buffer_calls": counts["cast_buffer_calls"],
            "peak/budget": ratio(peak, None if budget is None else budget / GIB),
            "result": result, "memory_required": first["plan"].memory_required}


# --- the part --------------------------------------------------------------------------------------

def scaled_budgets(setup: dict, full: dict) -> dict:
    """Each budget's bytes for this model, ``W + f * M`` (module docstring), from the full load."""
    weights = setup["bf16_weights_gib"] * GIB
    if full["peak_allocated_gib"] is None:   # a CPU: the trainer's working set, the cap's arithmetic
        working, source = full["memory_required"], "the trainer's working set (LoadPlan.memory_required)"
    else:
        working = full["measured_working_set_gib"] * GIB
        source = "the full load's peak allocated minus its resident weights"
    return {"working_set_gib": working / GIB, "working_set_from": source,
            "bytes": {str(b): int(working + setup["fraction_resident"][str(b)] * weights) for b in BUDGETS_GIB}}


def retryable(err: Exception, room: int | None, loads: list) -> bool:
    """A budget run that loaded and then ran out of device memory (PyTorch's OutOfMemoryError)."""
    return room is not None and bool(loads) and "OutOfMemoryError" in str(err)


def retry_capped(patcher, run: Run, latents, positive, setting: dict, steps: int, room: int,
                 memory_required: int, load: dict, error: str) -> dict:
    """The run again at the same budget with the ``max_vram_gb`` that leaves ``training.memory``'s
    working set free (what a user on that card would set after the automatic run ran out of
    memory; the trainer asks ComfyUI for its adapters only). ``load``: the failed run's first."""
    estimate = load["estimate"]
    if estimate is None:
        raise RuntimeError(error)
    gc.collect()   # what the failed run's frames held
    cap = room - max(0, estimate - load["plan"].memory_required)
    record = one_run(patcher, run, latents, positive, setting, steps, room, memory_required, cap=cap)
    record["automatic"] = {"status": "failed", "error": error[:400]}
    return record


def check(out: dict, *, tiny: bool, steps: int, folder: Path, latents, positive, budget, save: Callable) -> None:
    """Every run of :data:`RUNS` into ``out`` (``setup`` first), each under ``budget``'s guard."""
    import comfy.model_management as mm
    import quantized_models

    cfg = config(tiny)
    storage = torch.float32 if tiny else torch.bfloat16
    compute = "auto" if tiny else "bf16"
    bases: dict = {}
    setting: dict = {"compute": compute, "compute_dtype": storage if tiny else torch.bfloat16,
                     "latent_shape": tuple(latents["samples"].shape), "context_tokens": positive[0][0].shape[1]}
    done: dict[str, dict] = {}   # run name -> its record with the training result

    def estimate(name: str) -> float:
        if tiny:
            return 0.0
        if name == "setup":
            return SETUP_ESTIMATE_S
        return max((budget.taken[n] for n in RUNS if n in budget.taken), default=RUN_ESTIMATE_S)

    def setup() -> dict:
        from comfyui_tlora.tlora_core.schedule import default_min_rank

        gguf = quantized_models.gguf_pack_dir() is not None
        meta = comfy_runtime.build_model(FAMILY, cfg, device="meta").diffusion_model
        seconds: dict = {"write": {}, "load": {}}
        paths = write_bases(cfg, storage, folder, gguf, seconds["write"])
        for base, path in paths.items():
            start = time.perf_counter()
            bases[base] = load_base(base, path, cfg, storage, tiny)
            seconds["load"][base] = time.perf_counter() - start
        start = time.perf_counter()
        fractions = budget_fractions()
        seconds["memory_model"] = time.perf_counter() - start
        with train_memory() as tm:
            variant, rank = tm.RECIPES[FAMILY][:2]
        rank = 8 if tiny else rank
        setting.update(variant=variant, rank=rank, min_rank=default_min_rank(rank))
        return {"config": {k: cfg[k] for k in ("hidden_size", "context_in_dim", "depth", "depth_single_blocks")},
                "storage": str(storage), "compute_dtype": compute,
                "recipe": {k: setting[k] for k in ("variant", "rank", "min_rank")},
                "model_gib": {b: mm.module_size(p.model.diffusion_model) / GIB for b, p in bases.items()},
                "bf16_weights_gib": 2 * sum(t.numel() for t in meta.state_dict().values()) / GIB,
                "file_gib": {b: path.stat().st_size / GIB for b, path in paths.items()},
                "gguf": GGUF_TYPE if gguf else "not provisioned (ComfyUI-GGUF)", **fractions,
                "seconds_by_step": seconds}

    out["how"] = HOW
    budget.run(out, "streaming", "setup", setup, estimate_s=estimate("setup"))
    save()
    if out["setup"]["status"] != "ran":
        return

    def runner(name: str, run: Run) -> Callable[[], dict]:
        def fn() -> dict:
            room = None if run.budget is None else out["budgets"][run.base]["bytes"][str(run.budget)]
            memory_required = done[run.pair]["memory_required"] if run.floor else 0
            loads: list = []
            failure = None
            try:
                record = one_run(bases[run.base], run, latents, positive, setting, steps, room, memory_required,
                                 loads=loads)
            except RuntimeError as err:
                if not retryable(err, room, loads):
                    raise
                failure = str(err)   # retried below, once this exception (and its frames' tensors) is gone
            if failure is not None:
                record = retry_capped(bases[run.base], run, latents, positive, setting, steps, room,
                                      memory_required, loads[0], failure)
            if run.compare is not None:
                record["adapters_vs"] = {"run": run.compare,
                                         "max_diff": adapter_gap(record["result"], done[run.compare]["result"])}
            if run.budget is not None:
                full = done.get("floor_full" if run.floor else FULL_LOAD[run.base])
                record["s/step vs full load"] = ratio(record["s_per_step"], (full or {}).get("s_per_step"))
            if run.floor:
                record["tlora/floor"] = ratio(done[run.pair]["s_per_step"], record["s_per_step"])
            done[name] = record
            if name == FULL_LOAD[run.base]:
                out.setdefault("budgets", {})[run.base] = scaled_budgets(out["setup"], record)
            return {k: v for k, v in record.items() if k not in ("result", "memory_required")}
        return fn

    for name, run in RUNS.items():
        needs = [n for n in (run.compare, run.pair) if n]
        if run.budget is not None:
            needs.append(FULL_LOAD[run.base])   # the budgets come from it
        missing = [n for n in dict.fromkeys(needs) if n not in done]
        if run.base not in bases:
            out[name] = {"status": "skipped", "note": "skipped: ComfyUI-GGUF is not provisioned"}
        elif missing:
            out[name] = {"status": "skipped", "note": f"skipped: needs the {', '.join(missing)} run"}
        else:
            budget.run(out, "streaming", name, runner(name, run), estimate_s=estimate(name))
        save()
    baseline = out.get("full_again", {}).get("adapters_vs", {}).get("max_diff")
    out["baseline_adapter_max_diff"] = baseline
    for name in RUNS:
        vs = out[name].get("adapters_vs")
        if vs is not None and name != "full_again":
            vs["within_full_vs_full_baseline"] = None if baseline is None else vs["max_diff"] <= baseline
    save()


def table(out: dict) -> list[str]:
    """The part's lines for the check's table."""
    def f(value, fmt):
        return format("-", ">" + fmt.split(".")[0]) if value is None else format(value, fmt)

    setup = out.get("setup", {})
    if setup.get("status") != "ran":
        return [f"streaming setup {setup.get('status', 'missing')}: {setup.get('note') or setup.get('error', '')}"]
    lines = [f"{'streaming run':30} {'budget':>6} {'free':>6} {'resident':>8} {'GiB/step':>8} {'peak':>6} "
             f"{'peak/bud':>8} {'s/step':>7} {'vs full':>7} {'/floor':>6} {'adapter diff':>12}"]
    for name in RUNS:
        r = out.get(name, {})
        if r.get("status") != "ran":
            lines.append(f"{name:30} {r.get('status', 'missing')}: {r.get('note') or r.get('error', '')}")
            continue
        lines.append(
            f"{name:30} {f(r['budget_gib'], '6.2f')} {f(r['comfy_free_gib'], '6.1f')} {f(r['resident_gib'], '8.2f')} "
            f"{f(r['streamed_per_step_gib']['counted'], '8.2f')} {f(r['peak_allocated_gib'], '6.2f')} "
            f"{f(r['peak/budget'], '8.2f')} {f(r['s_per_step'], '7.3f')} {f(r.get('s/step vs full load'), '7.2f')} "
            f"{f(r.get('tlora/floor'), '6.2f')} {f(r.get('adapters_vs', {}).get('max_diff'), '12.2e')}"
            + (f"  automatic: out of memory; max_vram_gb {r['max_vram_gb']:.2f}" if "automatic" in r else ""))
    return lines
