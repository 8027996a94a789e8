"""The speed floor: T-LoRA Train's training step against the bare frozen model's forward + backward.

Any trainer of adapters on a frozen model pays at least one forward of the model and one backward
to its input (the gradient must cross every layer to reach the first adapter): the *floor*. This
bench times, side by side in one process on one CPU thread, on the same real-width SDXL slice:

- ``floor``: the bare diffusion model (ordinary weights, no adapters, no ComfyUI patcher), forward
  and backward of a mean-square loss to the latent input;
- ``floor:checkpointed``: the same with every ResBlock and transformer block checkpointed as
  T-LoRA Train checkpoints them (the floor of a run that recomputes: one more forward per block);
- ``tlora:full``: T-LoRA Train's own loop (:func:`training.loop.train`, the code the node runs) on
  the model as a ComfyUI loader makes it (inference-tensor weights), fully loaded, T-LoRA rank 64
  / min_rank 32 on the attention layers, AdamW, fp32, checkpointing off;
- ``tlora:checkpointed``: the same with checkpointing on (T-LoRA Train's default);
- ``tlora:streamed``: the same with ``max_vram_gb`` small enough that about half of the target
  layers stream (ComfyUI's own ``partially_unload`` picks them; checkpointing is then on).

The model: SDXL's real channel widths (320 / 640 / 1280, 64-channel heads, 2048-wide text, the
adm vector) with one ResBlock and one transformer block per level where SDXL has two and ten
(:data:`SLICE`: 436 M parameters, 7 transformer blocks, 56 attention adapters), on a
``--latent`` x ``--latent`` latent (default 32: a 256 x 256 image; tokens per level 1024 / 256 /
64), a 77-token prompt, batch 1, fp32.

Step time: the floor steps are timed one by one; a T-LoRA step is the interval between two
consecutive calls of the diffusion model's forward (one per step: backward, optimizer step, the
next step's inputs and factors lie in between). CPU time of the one thread (``process_time``) and
wall time. Runs take turns: each round runs every setting for ``--steps`` steps, its order
reversed every other round; per round the ratio of each T-LoRA setting's median step to its floor's
median step, then over the rounds the median and range of those ratios. ``--profile`` adds where
the time of one step goes (PyTorch's profiler, by operator) for ``floor`` and each T-LoRA setting.

    python bench/bench_floor.py [--rounds 5] [--steps 4] [--latent 32] [--profile]
    ->  bench/results/bench_floor.json (git-ignored)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO), str(REPO / "bench")]

import torch  # noqa: E402

import comfy_runtime  # noqa: E402

GIB = 2 ** 30
TOKENS = 77
SLICE = {"num_res_blocks": [1, 1, 1], "transformer_depth": [0, 1, 1], "transformer_depth_middle": 1,
         "transformer_depth_output": [0, 0, 1, 1, 1, 1]}
TLORA = dict(variant="tlora", rank=64, min_rank=32, compute_dtype="fp32", seed=0)
TINY_RANK = 4            # --tiny: the harness on the tests' tiny SDXL (32-wide layers)
STREAM_TARGET = 0.5      # the share of target layers the streamed run streams (about)
PAIRS = {"tlora:full": "floor", "tlora:checkpointed": "floor:checkpointed",
         "tlora:streamed": "floor:checkpointed"}
log = logging.getLogger("bench_floor")


def model_config(tiny: bool = False) -> dict:
    """The slice's unet config (``tiny``: the tests' tiny SDXL instead)."""
    return dict(comfy_runtime.TINY_SDXL_CONFIG) if tiny else {**comfy_runtime.REAL_SDXL_CONFIG, **SLICE}


def build(config: dict, inference: bool):
    """The model as a ModelPatcher with seeded fp32 weights; ``inference``: built under inference
    mode, as ComfyUI's loader nodes build a MODEL (the same seed gives the same weights)."""
    with torch.inference_mode(inference):
        return comfy_runtime.build_model("sdxl", config, seed=0)


def inputs(config: dict, latent: int):
    """(latent, timestep, context, adm vector) of one training example, and the node-like
    LATENT / CONDITIONING the trainer takes (the pooled vector is the adm vector less its six
    256-wide size embeddings)."""
    gen = torch.Generator().manual_seed(1)
    context, adm = config["context_dim"], config["adm_in_channels"]
    with torch.inference_mode():
        samples = torch.randn(1, 4, latent, latent, generator=gen)
        positive = comfy_runtime.fake_conditioning("sdxl", tokens=TOKENS, context_dim=context,
                                                   pooled_dim=adm - 6 * 256)
    raw = (samples.clone(), torch.tensor([500.0]), torch.randn(1, TOKENS, context, generator=gen),
           torch.randn(1, adm, generator=gen))
    return raw, {"samples": samples}, positive


def floor_runner(model, raw, checkpointing: bool):
    """Steps of the bare frozen model: forward, mean-square loss, backward to the input."""
    from comfyui_tlora.tlora_core import families
    from comfyui_tlora.training.prepare import _install_checkpointing, _Restorer

    dm = model.model.diffusion_model
    dm.requires_grad_(False)
    x, t, context, y = raw

    def run(steps: int) -> list[tuple[float, float]]:
        undo = _Restorer()
        if checkpointing:
            _install_checkpointing(dm, undo, families.get("sdxl").checkpoint_blocks)
        times = []
        try:
            for _ in range(steps):
                c0, w0 = time.process_time(), time.perf_counter()
                xi = x.clone().requires_grad_(True)
                dm(xi, t, context=context, y=y).float().square().mean().backward()
                times.append((time.process_time() - c0, time.perf_counter() - w0))
        finally:
            undo.undo()
        return times[1:]   # the first step warms caches up
    return run


def tlora_runner(model, latents, positive, tlora: dict, **config):
    """Steps of T-LoRA Train's loop; times between consecutive calls of the diffusion model."""
    import train_helpers as th

    def run(steps: int) -> list[tuple[float, float]]:
        stamps = []
        hook = model.model.diffusion_model.register_forward_pre_hook(
            lambda *_: stamps.append((time.process_time(), time.perf_counter())))
        try:
            th.train(model, latents, positive, steps=steps, **tlora, **config)
        finally:
            hook.remove()
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps[1:], stamps[2:])]
    return run


def _probe(model, latents, positive, tlora: dict, cap_gb: float) -> dict:
    """Load as a capped run does (no step): what was asked, what streams, of the target layers."""
    import train_helpers as th
    from comfyui_tlora.training import prepare
    from comfyui_tlora.training.targets import find_targets

    seen = {}
    real = prepare.LoadPlan.load

    def load(plan, patcher):
        where = real(plan, patcher)
        dm = patcher.model.diffusion_model
        names = {t.module for t in find_targets(dm, "sdxl")}
        seen.update(asked=plan.memory_required, residency=where, targets=len(names),
                    streamed_targets=sum(prepare.streams(dm.get_submodule(n)) for n in names))
        return where

    prepare.LoadPlan.load = load
    try:
        th.train(model, latents, positive, steps=0, **tlora, max_vram_gb=cap_gb)
    finally:
        prepare.LoadPlan.load = real
    return seen


def stream_cap(model, latents, positive, tlora: dict) -> tuple[float, dict]:
    """A ``max_vram_gb`` under which about :data:`STREAM_TARGET` of the target layers stream
    (bisection on the share of the weights kept resident)."""
    import comfy.model_management as mm

    weights = sum(mm.module_size(m) for m in model.model.diffusion_model.modules()
                  if hasattr(m, "weight_function") and isinstance(getattr(m, "weight", None), torch.Tensor))
    asked = _probe(model, latents, positive, tlora, 0.0)["asked"]
    low, high, best = 0.0, 1.0, None
    for _ in range(8):
        keep = (low + high) / 2
        cap = (asked + keep * weights) / GIB
        seen = _probe(model, latents, positive, tlora, cap)
        share = seen["streamed_targets"] / seen["targets"]
        if best is None or abs(share - STREAM_TARGET) < abs(best[1]["streamed_targets"] / best[1]["targets"] - STREAM_TARGET):
            best = (cap, seen)
        if abs(share - STREAM_TARGET) <= 0.1:
            break
        low, high = (keep, high) if share > STREAM_TARGET else (low, keep)
    return best


def _top(prof) -> list[tuple[str, float, int]]:
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in rows]


def _delta(rows: list, floor: list) -> list[tuple[str, float]]:
    """Per operator, the self CPU ms a step spends beyond the floor's step, largest first."""
    base = {k: ms for k, ms, _ in floor}
    out = [(k, ms - base.get(k, 0.0)) for k, ms, _ in rows]
    return sorted(out, key=lambda kv: kv[1], reverse=True)[:12]


def profile_floor(model, raw, checkpointing: bool) -> list[tuple[str, float, int]]:
    """The operators of one floor step by self CPU time (ms), most first (after a warm-up step)."""
    from torch.profiler import ProfilerActivity, profile

    run = floor_runner(model, raw, checkpointing)
    run(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(1)
    return _top(prof)


def profile_tlora(model, latents, positive, tlora: dict, **config) -> list[tuple[str, float, int]]:
    """The operators of one T-LoRA step (the second of three: from one call of the diffusion model
    to the next) by self CPU time (ms), most first."""
    import train_helpers as th
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    calls = [0]

    def at_forward(*_):
        calls[0] += 1
        if calls[0] == 2:
            prof.start()
        elif calls[0] == 3:
            prof.stop()

    hook = model.model.diffusion_model.register_forward_pre_hook(at_forward)
    try:
        th.train(model, latents, positive, steps=3, **tlora, **config)
    finally:
        hook.remove()
    return _top(prof)


def weight_copy_s(model, repeats: int = 5) -> float:
    """CPU seconds to copy every comfy-op layer's weight and bias once: what each forward of a
    T-LoRA step pays beyond the floor for handing autograd a copy of each weight (ComfyUI's cast
    with a weight function copies; a streamed layer's private clone copies once more)."""
    tensors = [t for m in model.model.diffusion_model.modules() if hasattr(m, "weight_function")
               for t in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(t, torch.Tensor)]
    times = []
    for _ in range(repeats):
        start = time.process_time()
        copies = [t.clone() for t in tensors]
        times.append(time.process_time() - start)
        del copies
    return statistics.median(times)


def _median(times: list[tuple[float, float]], which: int) -> float:
    return statistics.median(t[which] for t in times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is not timed)")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--only", help="comma-separated settings (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bench_floor.json",
                        help="where the JSON report goes")
    parser.add_argument("--tiny", action="store_true",
                        help=f"the tests' tiny SDXL at rank {TINY_RANK} (checks the harness, times nothing useful)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    comfy_runtime.bootstrap()
    logging.basicConfig(format="%(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)

    tlora = {**TLORA, "rank": TINY_RANK, "min_rank": TINY_RANK // 2} if args.tiny else dict(TLORA)
    config = model_config(args.tiny)
    raw, latents, positive = inputs(config, args.latent)
    plain, loaded = build(config, False), build(config, True)
    cap, probe = stream_cap(loaded, latents, positive, tlora)
    log.info("streamed run: max_vram_gb %.3f, %d of %d target layers stream (%s)", cap,
             probe["streamed_targets"], probe["targets"], probe["residency"].describe())
    runs = {"floor": floor_runner(plain, raw, False), "floor:checkpointed": floor_runner(plain, raw, True),
            "tlora:full": tlora_runner(loaded, latents, positive, tlora, gradient_checkpointing=False),
            "tlora:checkpointed": tlora_runner(loaded, latents, positive, tlora, gradient_checkpointing=True),
            "tlora:streamed": tlora_runner(loaded, latents, positive, tlora, gradient_checkpointing=True,
                                           max_vram_gb=cap)}
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    order = list(runs)
    rounds = []
    for i in range(args.rounds):
        times = {name: runs[name](args.steps) for name in (order if i % 2 == 0 else order[::-1])}
        rounds.append(times)
        log.info("round %d: %s", i + 1, ", ".join(f"{k} {_median(v, 0):.2f} s" for k, v in times.items()))
    report = {"model": "tiny SDXL" if args.tiny else {"real SDXL widths": SLICE}, "latent": args.latent,
              "tokens": TOKENS, "tlora": tlora,
              "params": sum(p.numel() for p in plain.model.diffusion_model.parameters()),
              "stream": {"max_vram_gb": cap, "streamed_targets": probe["streamed_targets"],
                         "targets": probe["targets"], "residency": probe["residency"].describe(),
                         "asked_gib": probe["asked"] / GIB},
              "settings": {}, "ratios": {}}
    for name in runs:
        cpu = [_median(r[name], 0) for r in rounds]
        report["settings"][name] = {"step_cpu_s": statistics.median(cpu), "range_cpu_s": [min(cpu), max(cpu)],
                                    "step_wall_s": statistics.median(_median(r[name], 1) for r in rounds)}
    for name, floor in PAIRS.items():
        if name in runs and floor in runs:
            per_round = [_median(r[name], 0) / _median(r[floor], 0) for r in rounds]
            report["ratios"][f"{name} / {floor}"] = {"median": statistics.median(per_round),
                                                     "range": [min(per_round), max(per_round)]}
        if name in runs and "floor" in runs and floor != "floor":
            per_round = [_median(r[name], 0) / _median(r["floor"], 0) for r in rounds]
            report["ratios"][f"{name} / floor"] = {"median": statistics.median(per_round),
                                                   "range": [min(per_round), max(per_round)]}
    for key, r in report["ratios"].items():
        log.info("%s: %.3fx (rounds %.3f-%.3f)", key, r["median"], *r["range"])
    report["weight_copy_cpu_s"] = weight_copy_s(plain)
    log.info("copying every weight once: %.2f s CPU", report["weight_copy_cpu_s"])
    if args.profile:
        report["profile"] = {"floor": profile_floor(plain, raw, False),
                             "floor:checkpointed": profile_floor(plain, raw, True)}
        for name, config in (("tlora:full", {"gradient_checkpointing": False}),
                             ("tlora:checkpointed", {"gradient_checkpointing": True}),
                             ("tlora:streamed", {"gradient_checkpointing": True, "max_vram_gb": cap})):
            report["profile"][name] = profile_tlora(loaded, latents, positive, tlora, **config)
        for name, rows in report["profile"].items():
            log.info("%s, one step, self CPU ms by operator: %s", name,
                     "; ".join(f"{k} {ms:.0f} ({c})" for k, ms, c in rows[:10]))
        report["beyond_floor"] = {name: _delta(report["profile"][name], report["profile"][floor])
                                  for name, floor in PAIRS.items()}
        for name, rows in report["beyond_floor"].items():
            log.info("%s beyond %s, self CPU ms by operator: %s", name, PAIRS[name],
                     "; ".join(f"{k} {ms:+.0f}" for k, ms in rows[:8]))
        for name in report["profile"]:
            report["profile"][name] = report["profile"][name][:15]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
