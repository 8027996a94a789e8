"""Training step time and peak memory: T-LoRA Train vs ComfyUI's built-in TrainLoraNode, tiny models.

Every figure is measured in this run, on the same tiny SDXL / FLUX (ComfyUI's own classes), the
same two 32x32 latents, batch 1, the same rank, fp32, one CPU thread (so other processes on the
machine disturb the timings less), with gradient checkpointing on for both trainers and, on SDXL,
also off (both checkpoint each ResBlock and transformer block of the SDXL UNet).
The base weights are ordinary tensors: with the inference-tensor weights a loader node produces,
ComfyUI's trainer cannot run at all on FLUX, nor on SDXL once restricted to attention layers
("Inference tensors cannot be saved for backward"). ``ours:tlora@inference`` repeats our T-LoRA
run on inference-tensor weights to show the cost of our workaround. Runs:

- ``ours:<variant>``: :func:`training.loop.train` with the paper's attention targets, for each variant
  (tlora = Ortho + mask, vanilla = mask, ortho = Ortho without mask, lora = plain LoRA);
- ``comfy:attention``: ComfyUI 0.3.75 ``TrainLoraNode`` restricted to the same attention modules
  (its module scan is filtered for the one call that creates the adapters). On FLUX it fails
  (checkpointing on: recomputation mismatch; off: FLUX's in-place updates), and the JSON says so;
- ``comfy:all``: ``TrainLoraNode`` as shipped (every Linear / Conv plus bias and norm offsets), for
  context.

Step time = the interval between two consecutive calls of the diffusion model's forward (each
trainer calls it once per step: forward, backward and optimizer step lie in between), in CPU time
(``step_cpu_s``, one thread: little affected by other processes) and wall time, without the first
step of each run. The runs of a family share one process and take turns in short runs of 8 steps,
20 rounds, the order reversed every round, so that the slow drifts of a shared machine's speed hit
every run alike. Per run: the median of the 120 steps timed (``step_cpu_s``, quartiles alongside)
and their 10th percentile (``step_cpu_p10_s``: a shared machine only ever adds time, so the fast
steps show the loop's own cost best). Peak memory, per run in a fresh process: ``peak_tensor_mb``,
the peak of the bytes held by tensors during a 5-step run above its start, counted from every
allocation and free by PyTorch's memory profiler (after a 5-step warm-up; on a GPU this is what
``max_memory_allocated`` reports), and ``peak_rss_rise_mb``, the rise of the process's peak
resident set size (VmHWM, reset through /proc/self/clear_refs) during the first 5-step run, which
also counts the libraries' own first-use allocations. The mask's cost is also accounted directly
(``mask_cost_<masked>_vs_<twin>.accounted``): the per-step work only the masked variant does,
timed alone (:func:`mask_work`), added to its unmasked twin's median step; whole steps of two
variants differ by less than this machine's drift. These are CPU figures on a toy model; they
compare the two loops, not GPU behaviour. Results:
``bench/results/bench_train.json`` (git-ignored).

    python bench/bench_train.py [--rank 4] [--family sdxl flux] [--checkpointing both]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
RUNS = ["ours:tlora", "ours:vanilla", "ours:ortho", "ours:lora", "ours:tlora@inference",
        "comfy:attention", "comfy:all"]
SIZE, IMAGES = 32, 2
ROUNDS, ROUND_STEPS = 20, 8
log = logging.getLogger("bench_train")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _setup(family: str, inference_weights: bool):
    sys.path[:0] = [str(REPO / "tests"), str(REPO)]
    import torch

    import comfy_runtime

    torch.set_num_threads(1)
    comfy_runtime.bootstrap()
    comfy_runtime.init_nodes()
    with torch.inference_mode(inference_weights):
        model = comfy_runtime.build_model(family)
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(0)
        latents = [{"samples": torch.randn(comfy_runtime.latent_shape(family, 1, SIZE), generator=gen)}
                   for _ in range(IMAGES)]
        positive = comfy_runtime.fake_conditioning(family)
    return model, latents, positive


def _ours(family: str, variant: str, rank: int, checkpointing: bool, model, latents, positive):
    import torch
    from comfyui_tlora.tlora_core.schedule import default_min_rank
    from comfyui_tlora.training import inputs, loop

    with torch.inference_mode():
        samples = torch.cat([lat["samples"] for lat in latents])
        with torch.inference_mode(False):
            data = inputs.prepare_data(model.model, inputs.family_of(model.model), samples, positive, None,
                                       torch.device("cpu"))

    def run(steps: int) -> None:
        config = loop.TrainConfig(variant=variant, rank=rank, min_rank=default_min_rank(rank), steps=steps,
                                  gradient_checkpointing=checkpointing, compute_dtype="fp32")
        with torch.inference_mode():
            loop.train(model, data, config)
    return run


def _attention_only(model, family: str):
    """Make TrainLoraNode's one module scan (adapter creation) see only our attention targets."""
    from comfyui_tlora.training.targets import find_targets

    keep = {t.module for t in find_targets(model.model.diffusion_model, family)}
    base = model.model
    original = base.named_modules

    def filtered(*args, **kwargs):
        del base.named_modules   # one call only: ComfyUI's loader scans modules again later
        for name, module in original(*args, **kwargs):
            if name.removeprefix("diffusion_model.") in keep:
                yield name, module

    base.named_modules = filtered


def _comfy(family: str, scope: str, rank: int, checkpointing: bool, model, latents, positive):
    import torch
    from comfy_extras.nodes_train import TrainLoraNode

    def run(steps: int) -> None:
        if scope == "attention":
            _attention_only(model, family)
        with torch.inference_mode():
            TrainLoraNode.execute(
                model=[model], latents=latents, positive=[positive], batch_size=[1], steps=[steps],
                grad_accumulation_steps=[1], learning_rate=[1e-4], rank=[rank], optimizer=["AdamW"],
                loss_function=["MSE"], seed=[0], training_dtype=["fp32"], lora_dtype=["fp32"],
                algorithm=["LoRA"], gradient_checkpointing=[checkpointing], existing_lora=["[None]"])
    return run


def _make_run(family: str, run_name: str, rank: int, checkpointing: bool):
    """``(run(steps), model)`` for one named run."""
    name, _, weights = run_name.partition("@")
    model, latents, positive = _setup(family, weights == "inference")
    kind, _, arg = name.partition(":")
    trainer = _ours if kind == "ours" else _comfy
    return trainer(family, arg, rank, checkpointing, model, latents, positive), model


def _step_clock(model) -> list[tuple[float, float]]:
    """(cpu, wall) time stamps of every call of ``model``'s diffusion model (one per step)."""
    stamps: list[tuple[float, float]] = []
    model.model.diffusion_model.register_forward_pre_hook(
        lambda *_: stamps.append((time.process_time(), time.perf_counter())))
    return stamps


def _quartiles(values: list[float]) -> dict:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return {"median": median, "q1": q1, "q3": q3, "p10": statistics.quantiles(values, n=10)[0]}


def time_worker(family: str, rank: int, checkpointing: bool) -> dict:
    """Every run in this one process, taking turns in short runs (see the module docstring)."""
    logging.disable(logging.INFO)
    runs, clocks = {}, {}
    for name in RUNS:
        try:
            runs[name], model = _make_run(family, name, rank, checkpointing)
            clocks[name] = _step_clock(model)
            runs[name](3)   # warm-up; also shows whether this trainer can run this model at all
        except Exception as err:  # report it (ComfyUI's trainer fails on some setups) and go on
            runs.pop(name, None)
            log.debug("%s failed", name, exc_info=True)
            runs_failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    steps: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    order = list(runs)
    for round_ in range(ROUNDS):
        for name in order if round_ % 2 == 0 else order[::-1]:
            clock = clocks[name]
            clock.clear()
            runs[name](ROUND_STEPS)
            # Intervals between consecutive steps, without the run's first step.
            steps[name] += [(c2 - c1, w2 - w1) for (c1, w1), (c2, w2) in zip(clock[1:], clock[2:])]
    out = {}
    for name, intervals in steps.items():
        cpu, wall = _quartiles([c for c, _ in intervals]), _quartiles([w for _, w in intervals])
        out[name] = {"step_cpu_s": cpu["median"], "step_cpu_p10_s": cpu["p10"], "step_wall_s": wall["median"],
                     "step_cpu_quartiles_s": [cpu["q1"], cpu["q3"]], "steps_timed": len(intervals)}
    out.update({name: {"error": msg} for name, msg in runs_failed.items()})
    out["mask_work_s"] = mask_work(family, rank)
    return out


runs_failed: dict[str, str] = {}


def mask_work(family: str, rank: int, repeats: int = 15) -> dict:
    """CPU seconds per step of each variant's own per-step adapter work, outside the layers: the
    step's rank masks, building the factors (slices of the active columns; Ortho's products) and
    their backward, over 20 timesteps spread across [0, 999]. The difference between a masked
    variant and its unmasked twin is what the mask adds to a step beside the layers, where it only
    removes columns; unlike a whole step it is small enough to time without the machine's drift."""
    import torch

    model, _, _ = _setup(family, False)
    from comfyui_tlora.tlora_core.schedule import default_min_rank
    from comfyui_tlora.training import loop, modules, targets
    found = targets.find_targets(model.model.diffusion_model, family)
    out = {}
    for variant in ("vanilla", "lora", "tlora", "ortho"):
        config = loop.TrainConfig(variant=variant, rank=rank, min_rank=default_min_rank(rank))
        adapters = modules.AdapterSet(found, variant, rank, seed=0)
        adapters.attach(model.model.diffusion_model, modules.RankState(strict=True), config.schedule())
        best = float("inf")
        with torch.enable_grad():
            for _ in range(repeats):
                start = time.process_time()
                for t in torch.linspace(0, 999, 20):
                    adapters.begin_step(t.reshape(1))
                    sum(f.sum() for a in adapters.adapters for f in a.step_factors[1]).backward()
                    adapters.end_step()
                best = min(best, (time.process_time() - start) / 20)
        adapters.detach()
        out[variant] = best
    return out


def _peak_tensor_mb(run) -> float:
    """Peak of the bytes held by CPU tensors during ``run(5)``, above its start, from PyTorch's
    memory profiler (every allocation and free, in order: a count, not a sample)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        run(5)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        times, sizes = json.loads(Path(path).read_text())
    totals = [sum(row) for row in sizes]
    return (max(totals) - totals[0]) / 2**20 if totals else 0.0


def memory_worker(family: str, run_name: str, rank: int, checkpointing: bool) -> dict:
    logging.disable(logging.INFO)
    run, _ = _make_run(family, run_name, rank, checkpointing)
    rss = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current RSS
    try:
        run(5)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    out = {"peak_rss_rise_mb": (_status_kb("VmHWM") - rss) / 1024}
    out["peak_tensor_mb"] = _peak_tensor_mb(run)   # the first run was its warm-up
    return out


def _spawn(family: str, run_name: str, rank: int, what: str, checkpointing: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", family, run_name, what, "--rank", str(rank),
           "--checkpointing", "on" if checkpointing else "off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratios(rows: dict) -> dict:
    def ratio(a: str, b: str, key: str):
        x, y = rows.get(a, {}).get(key), rows.get(b, {}).get(key)
        return None if x is None or y is None or y == 0 else round(x / y, 3)

    out = {}
    for key in ("step_cpu_s", "step_cpu_p10_s", "step_wall_s", "peak_tensor_mb", "peak_rss_rise_mb"):
        out[f"tlora_vs_comfy_attention.{key}"] = ratio("ours:tlora", "comfy:attention", key)
        out[f"lora_vs_comfy_attention.{key}"] = ratio("ours:lora", "comfy:attention", key)
        out[f"tlora_vs_comfy_all.{key}"] = ratio("ours:tlora", "comfy:all", key)
        out[f"mask_cost_vanilla_vs_lora.{key}"] = ratio("ours:vanilla", "ours:lora", key)
        out[f"mask_cost_tlora_vs_ortho.{key}"] = ratio("ours:tlora", "ours:ortho", key)
        out[f"inference_weights_cost.{key}"] = ratio("ours:tlora@inference", "ours:tlora", key)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--family", nargs="+", default=["sdxl", "flux"])
    parser.add_argument("--checkpointing", choices=["on", "off", "both"], default="both",
                        help="gradient checkpointing for both trainers (FLUX: always on; ours needs it)")
    parser.add_argument("--worker", nargs=3, metavar=("FAMILY", "RUN", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        family, run_name, what = args.worker
        checkpointing = args.checkpointing == "on"
        result = time_worker(family, args.rank, checkpointing) if what == "time" else \
            memory_worker(family, run_name, args.rank, checkpointing)
        print(json.dumps(result))  # noqa: T201
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": 1},
              "rank": args.rank, "latent": [IMAGES, SIZE, SIZE], "rounds": ROUNDS,
              "steps_per_round": ROUND_STEPS, "families": {}}
    settings = {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]
    for family in args.family:
        for checkpointing in settings if family == "sdxl" else [True]:
            label = f"{family}, checkpointing {'on' if checkpointing else 'off'}"
            timing = _spawn(family, "all", args.rank, "time", checkpointing)
            rows = {}
            for run_name in RUNS:
                rows[run_name] = {**timing.get(run_name, timing),
                                  **_spawn(family, run_name, args.rank, "memory", checkpointing)}
                log.info("%s | %-22s %s", label, run_name, rows[run_name])
            ratios = _ratios(rows)
            work = timing.get("mask_work_s", {})
            # The mask's own work added to the unmasked twin's median step (see mask_work).
            for masked, twin in (("vanilla", "lora"), ("tlora", "ortho")):
                step = rows.get(f"ours:{twin}", {}).get("step_cpu_s")
                if step and masked in work:
                    ratios[f"mask_cost_{masked}_vs_{twin}.accounted"] = \
                        round((step + work[masked] - work[twin]) / step, 4)
            report["families"][label] = {"runs": rows, "ratios": ratios, "mask_work_s": work}
            for key, value in report["families"][label]["ratios"].items():
                log.info("%s | %-42s %s", label, key, value)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_train.json").write_text(json.dumps(report, indent=2))
    log.info("wrote %s", RESULTS / "bench_train.json")


if __name__ == "__main__":
    main()
