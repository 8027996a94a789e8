"""Prodigy vs AdamW in T-LoRA Train's loop: step time side by side, as ratios measured in one run.

Two measurements, each taking turns between the optimizers (short runs, the order reversed every
round, so a shared machine's slow drifts hit both alike), one CPU thread:

- ``loop:<family>``: whole training steps of :func:`training.loop.train` on the tiny SDXL / FLUX
  (ComfyUI's own classes), 32x32 latent, batch 1, rank 8, the family's variant, fp32, gradient
  checkpointing on; step time = the interval between two ``on_step`` calls (forward, backward,
  clipping and the optimizer step), without each run's first step. A tiny model's forward and
  backward are as small as its adapters, so this ratio says little about real sizes on its own;
- ``optimizer_step:flux_real``: ``optimizer.step()`` alone on the adapters of real-size FLUX.1
  (the recipe's Vanilla T-LoRA, rank 32 on the attention layers: 48.6 M trainable parameters) with
  fixed random gradients: the part of a real-size step that differs between the two optimizers.
  With the optimizers' state bytes (Prodigy keeps ``s`` and ``p0`` besides Adam's two moments).

Per run: the median CPU time per step (``step_cpu_s``) and its 10th percentile; ``ratio`` =
Prodigy / AdamW of the medians. CPU figures; they compare the two optimizers, not GPU times.
Results: ``bench/results/bench_optimizer.json`` (git-ignored).

    python bench/bench_optimizer.py [--rounds 8] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
OPTIMIZERS = {"AdamW": 1e-4, "Prodigy": 1.0}   # optimizer -> its learning_rate (the reference's)


def _setup():
    sys.path[:0] = [str(REPO / "tests"), str(REPO)]
    import torch

    import comfy_runtime

    torch.set_num_threads(1)
    comfy_runtime.bootstrap()
    comfy_runtime.init_nodes()
    return comfy_runtime


def _summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"step_cpu_s": statistics.median(ordered), "step_cpu_p10_s": ordered[len(ordered) // 10],
            "steps_timed": len(ordered)}


def _interleaved(runs: dict, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(rounds):
        order = list(runs) if index % 2 == 0 else list(reversed(runs))
        for name in order:
            times[name] += runs[name]()
    return times


def _loop_runs(comfy_runtime, family: str, steps: int) -> dict:
    import torch
    from comfyui_tlora.tlora_core.schedule import default_min_rank
    from comfyui_tlora.training import inputs, loop

    with torch.inference_mode():
        model = comfy_runtime.build_model(family)
        latents = torch.randn(comfy_runtime.latent_shape(family, 1, 32),
                              generator=torch.Generator().manual_seed(0))
        positive = comfy_runtime.fake_conditioning(family)
        with torch.inference_mode(False):
            data = inputs.prepare_data(model.model, inputs.family_of(model.model), latents, positive, None,
                                       torch.device("cpu"))
    variant = inputs.family_of(model.model).recipe.variant

    def run_of(optimizer: str):
        def run() -> list[float]:
            stamps = []
            config = loop.TrainConfig(variant=variant, rank=8, min_rank=default_min_rank(8), steps=steps,
                                      optimizer=optimizer, learning_rate=OPTIMIZERS[optimizer],
                                      compute_dtype="fp32", gradient_checkpointing=True)
            with torch.inference_mode():
                loop.train(model, data, config, on_step=lambda *a: stamps.append(time.process_time()))
            return [b - a for a, b in zip(stamps, stamps[1:])]
        return run

    return {name: run_of(name) for name in OPTIMIZERS}


def _optimizer_step_runs(comfy_runtime, steps: int) -> tuple[dict, dict, dict]:
    import torch
    from comfyui_tlora.training import modules, optim, targets

    model = comfy_runtime.build_model("flux", comfy_runtime.REAL_FLUX_CONFIG, device="meta")
    found = targets.find_targets(model.diffusion_model, "flux", "attention")
    # Each optimizer steps its own copy of the same fresh adapters: on shared tensors the first
    # would move the zero-initialised up factors, and Prodigy would then keep a full p0 of them
    # (its state, and its step, larger than in a real run).
    params = {name: list(modules.AdapterSet(found, "vanilla", 32, seed=0).parameters()) for name in OPTIMIZERS}
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params["AdamW"]]
    made = {name: optim.make_optimizer(params[name], name, lr, (0.9, 0.999), 1e-4, torch.device("cpu"))
            for name, lr in OPTIMIZERS.items()}

    def run_of(name: str):
        def run() -> list[float]:
            out = []
            for _ in range(steps):
                for p, g in zip(params[name], grads):
                    p.grad = g.clone()
                start = time.process_time()
                made[name].step()
                out.append(time.process_time() - start)
                made[name].zero_grad(set_to_none=True)
            return out[1:]
        return run

    runs = {name: run_of(name) for name in OPTIMIZERS}
    extra = {"trainable_parameters": sum(p.numel() for p in params["AdamW"])}
    return runs, extra, made


def _state_bytes(optimizer) -> int:
    import torch

    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is not timed)")
    args = parser.parse_args()
    comfy_runtime = _setup()
    import torch

    results: dict = {"python": platform.python_version(), "torch": torch.__version__,
                     "rounds": args.rounds, "steps_per_run": args.steps}
    for family in ("sdxl", "flux"):
        times = _interleaved(_loop_runs(comfy_runtime, family, args.steps), args.rounds)
        results[f"loop:{family}"] = {name: _summary(t) for name, t in times.items()}
    runs, extra, made = _optimizer_step_runs(comfy_runtime, args.steps)
    times = _interleaved(runs, args.rounds)
    results["optimizer_step:flux_real"] = {
        **extra, **{name: {**_summary(t), "state_mb": _state_bytes(made[name]) / 2**20}
                    for name, t in times.items()}}
    for value in results.values():
        if isinstance(value, dict) and "AdamW" in value:
            value["ratio"] = value["Prodigy"]["step_cpu_s"] / value["AdamW"]["step_cpu_s"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_optimizer.json").write_text(json.dumps(results, indent=2))
    for key, value in results.items():
        if isinstance(value, dict) and "ratio" in value:
            a, p = value["AdamW"], value["Prodigy"]
            print(f"{key:28s} AdamW {a['step_cpu_s'] * 1e3:8.2f} ms  Prodigy {p['step_cpu_s'] * 1e3:8.2f} ms  "   # noqa: T201
                  f"Prodigy / AdamW {value['ratio']:.2f}")


if __name__ == "__main__":
    main()
