"""GPU check: T-LoRA Train and the T-LoRA Loader under ComfyUI's dynamic VRAM, one command.

ComfyUI 0.33+ hands nodes a dynamic-VRAM ``ModelPatcherDynamic`` on a GPU (never with ``--cpu``,
so nothing on a CPU runs it). Its cast path can give a layer its cached VRAM weight instead of a
fresh copy, and its models are re-loaded by their loader for a non-dynamic copy. This script loads
SDXL (real size, bf16) and FLUX.1 (real widths, 2 double + 4 single blocks, fp8 storage, bf16
compute) through ComfyUI's own diffusion-model loader from random-weight files it writes itself
(no download), and measures, for the dynamic and the non-dynamic load of the same file:

- ``train``: T-LoRA training steps at 1024x1024: seconds per step (median after the first), peak
  CUDA memory, the ComfyUI training flags seen during the model calls, and the adapters' largest
  difference between the two loads (the trainer trains a dynamic model on its non-dynamic
  delegate, so they should agree up to GPU non-determinism);
- ``train_on_dynamic_clone``: the same run forced onto a plain clone of the dynamic patcher (what
  the trainer avoids): whether it runs at all and how far it lands from the delegate's result;
- ``loader``: 4 Euler steps with the trained file applied by the T-LoRA Loader's patch: seconds and
  the largest latent difference between the dynamic and the non-dynamic model.

    COMFYUI_ROOT=<a ComfyUI 0.33+ root> python bench/gpu_check.py     # one CUDA GPU, a few minutes
    python bench/gpu_check.py --tiny                                  # CPU, tiny models: the logic

``--tiny`` runs every step on the tests' tiny models on the CPU (no dynamic patcher exists there),
so the test suite can check the script itself. Writes ``bench/results/gpu_check.json`` (or
``--out``) and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))   # the harness (comfy_runtime imports the pack itself)

import torch  # noqa: E402

import comfy_runtime  # noqa: E402

# (config, weight dtype, compute dtype, context dim, pooled dim, latent side) per family.
FLUX_SHORT = {**comfy_runtime.REAL_FLUX_CONFIG, "depth": 2, "depth_single_blocks": 4}
FULL = {"sdxl": (comfy_runtime.REAL_SDXL_CONFIG, torch.bfloat16, None, 2048, 1280, 128),
        "flux": (FLUX_SHORT, torch.float8_e4m3fn, torch.bfloat16, 4096, 768, 128)}
TINY = {"sdxl": (None, torch.float32, None, 32, 32, 8), "flux": (None, torch.float32, None, 32, 32, 8)}


def _model_file(family: str, spec, folder: Path) -> Path:
    """A random-weight diffusion-model file of ``family`` (ComfyUI's own key names)."""
    import safetensors.torch

    shapes = comfy_runtime.build_model(family, spec[0], device="meta").diffusion_model.state_dict()
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (0.02 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16) for k, v in shapes.items()}
    path = folder / f"{family}.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    return path


def _loader(family: str, spec, tiny: bool, folder: Path):
    """``load(disable_dynamic) -> ModelPatcher`` through ComfyUI's own diffusion-model loader (the
    tiny shapes are not detectable: there the harness builds the model, with a loader factory)."""
    if tiny:
        def load(disable_dynamic: bool = False):
            patcher = comfy_runtime.build_model(family, spec[0])
            patcher.cached_patcher_init = (lambda *a, disable_dynamic=False: load(True), ())
            return patcher
        return load
    import comfy.sd

    path = _model_file(family, spec, folder)
    options = {"dtype": spec[1]} if spec[1] != torch.bfloat16 else {}

    def load(disable_dynamic: bool = False):
        kwargs = {"disable_dynamic": True} if disable_dynamic else {}
        return comfy.sd.load_diffusion_model(str(path), model_options=options, **kwargs)
    return load


def _flags() -> dict:
    import comfy.model_management as mm

    return {n: getattr(mm, n) for n in ("in_training", "training_fp8_bwd") if hasattr(mm, n)}


def _train(patcher, family: str, spec, steps: int) -> dict:
    import comfy.patcher_extension
    import train_helpers as th

    seen, times = [], []

    def watch(executor, *args, **kwargs):
        seen.append(_flags())
        times.append(time.perf_counter())
        return executor(*args, **kwargs)

    watched = patcher.clone()
    watched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "gpu_check", watch)
    side, ctx, pooled = spec[5], spec[3], spec[4]
    with torch.inference_mode():
        latents = {"samples": torch.randn(comfy_runtime.latent_shape(family, 1, side),
                                          generator=torch.Generator().manual_seed(1))}
        positive = comfy_runtime.fake_conditioning(family, context_dim=ctx, pooled_dim=pooled)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rank = 4 if spec[0] is None else 32
    compute = {None: "auto", torch.bfloat16: "bf16"}[spec[2]]
    result = th.train(watched, latents, positive, rank=rank, min_rank=rank // 2, steps=steps,
                      compute_dtype=compute, learning_rate=1e-4)
    gaps = [b - a for a, b in zip(times, times[1:])][1:] or [0.0]
    return {"result": result, "s_per_step": statistics.median(gaps), "flags_seen": seen[0] if seen else {},
            "flags_constant": all(f == seen[0] for f in seen),
            "peak_cuda_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def _adapter_gap(a, b) -> float:
    return max(float((x.up - y.up).abs().max()) for name in a.weights.adapters
               for x, y in zip(a.weights.adapters[name], b.weights.adapters[name]))


def _sample(patcher, family: str, spec, weights) -> tuple[torch.Tensor, float]:
    from comfyui_tlora.nodes import patch

    model = patcher.clone()
    patch.install(model, weights)
    ctx, pooled, side = spec[3], spec[4], spec[5]
    conds = [comfy_runtime.fake_conditioning(family, seed=s, context_dim=ctx, pooled_dim=pooled) for s in (1, 2)]
    start = time.perf_counter()
    latent = comfy_runtime.sample(model, family, steps=4, seed=3, size=side, cfg=2.0,
                                  positive=conds[0], negative=conds[1])
    return latent, time.perf_counter() - start


def check_family(family: str, tiny: bool, steps: int, folder: Path) -> dict:
    from comfyui_tlora.training import prepare

    spec = (TINY if tiny else FULL)[family]
    load = _loader(family, spec, tiny, folder)
    dynamic, plain = load(), load(disable_dynamic=True)
    out = {"dynamic_patcher": bool(getattr(dynamic, "is_dynamic", lambda: False)())}
    runs = {"dynamic": _train(dynamic, family, spec, steps), "non_dynamic": _train(plain, family, spec, steps)}
    out["train"] = {name: {k: v for k, v in run.items() if k != "result"} for name, run in runs.items()}
    out["train"]["adapter_max_diff"] = _adapter_gap(runs["dynamic"]["result"], runs["non_dynamic"]["result"])
    real_clone = prepare._training_clone
    prepare._training_clone = lambda patcher: patcher.clone()
    try:
        forced = _train(dynamic, family, spec, steps)
        out["train_on_dynamic_clone"] = {"ran": True, "adapter_max_diff": _adapter_gap(
            forced["result"], runs["non_dynamic"]["result"])}
    except Exception as err:  # the diagnostic: what a trainer without the delegate would hit
        out["train_on_dynamic_clone"] = {"ran": False, "error": f"{type(err).__name__}: {err}"[:300]}
    finally:
        prepare._training_clone = real_clone
    weights = runs["non_dynamic"]["result"].weights
    got, got_s = _sample(dynamic, family, spec, weights)
    want, want_s = _sample(plain, family, spec, weights)
    out["loader"] = {"dynamic_s": got_s, "non_dynamic_s": want_s,
                     "latent_max_diff": float((got.float() - want.float()).abs().max())}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny models: check the script's logic")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 6, tiny 3)")
    parser.add_argument("--family", nargs="+", default=["sdxl", "flux"], choices=["sdxl", "flux"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny on a CPU")
    comfy_runtime.bootstrap(cpu=args.tiny)
    import comfy.model_management as mm

    report = {"comfyui_root": comfy_runtime.comfyui_root().name, "tiny": args.tiny,
              "device": str(mm.get_torch_device()), "torch": torch.__version__, "families": {}}
    with tempfile.TemporaryDirectory() as folder:
        for family in args.family:
            report["families"][family] = check_family(family, args.tiny, args.steps or (3 if args.tiny else 6),
                                                      Path(folder))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    lines = [f"{'family':7} {'dynamic':8} {'s/step dyn':>10} {'s/step':>8} {'peak GB':>8} {'adapter diff':>12} "
             f"{'on clone':>9} {'loader diff':>11}"]
    for family, r in report["families"].items():
        t = r["train"]
        peak = t["dynamic"]["peak_cuda_gb"]
        lines.append(f"{family:7} {str(r['dynamic_patcher']):8} {t['dynamic']['s_per_step']:10.3f} "
                     f"{t['non_dynamic']['s_per_step']:8.3f} {('-' if peak is None else f'{peak:.1f}'):>8} "
                     f"{t['adapter_max_diff']:12.2e} {str(r['train_on_dynamic_clone']['ran']):>9} "
                     f"{r['loader']['latent_max_diff']:11.2e}")
    sys.stdout.write("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
