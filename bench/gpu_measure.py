"""Measuring for bench/gpu_check.py: CUDA-synchronised step and sampler clocks, a block's peak
memory, device memory held back so that ComfyUI sees a given budget free, adapter differences, and
the run's time guard. Without CUDA every memory figure is None and times are wall times of the CPU
work."""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

GIB = 2 ** 30
REPO = Path(__file__).resolve().parents[1]


def sync() -> None:
    """Wait for the GPU's queued work (before every time stamp)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_used_gib() -> float | None:
    """GPU memory in use on the device (all allocators: PyTorch's, comfy-aimdo's dynamic-VRAM
    weights, the CUDA context), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / GIB


@contextlib.contextmanager
def measured(out: dict):
    """Wall seconds of the block into ``out``, and on CUDA its peak memory: every model is unloaded
    and the peak statistics reset first, so the peak is the block's own. ``peak_allocated_gib`` is
    PyTorch's allocator only: weights that dynamic VRAM streams through comfy-aimdo are not in it
    (the step clocks sample the whole device's use for those)."""
    import comfy.model_management as mm

    with torch.inference_mode():   # as ComfyUI unloads (its nodes run in it): a quantized MODEL
        mm.unload_all_models()     # unloaded outside it cannot be loaded again
        mm.soft_empty_cache()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out["allocated_before_gib"] = torch.cuda.memory_allocated() / GIB
        out["device_used_before_gib"] = device_used_gib()
    start = time.perf_counter()
    try:
        yield out
    finally:
        sync()
        out["wall_s"] = time.perf_counter() - start
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB if cuda else None
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB if cuda else None


class StepClock:
    """Time stamps of every optimizer step while :meth:`counting` (one per training step in both
    trainers; model calls would not do: a checkpointed whole model calls its wrappers again in
    backward), taken after a CUDA synchronize, and the ComfyUI training flags seen at each
    diffusion-model call of ``self.patcher`` (a clone of ``patcher``)."""

    def __init__(self, patcher) -> None:
        import comfy.patcher_extension

        self.stamps: list[float] = []
        self.device_used: list[float | None] = []
        self.flags: list[dict] = []
        self.patcher = patcher.clone()
        self.patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "gpu_check",
                                          self._watch)

    def _watch(self, executor, *args, **kwargs):
        import comfy.model_management as mm

        self.flags.append({n: getattr(mm, n) for n in ("in_training", "training_fp8_bwd") if hasattr(mm, n)})
        return executor(*args, **kwargs)

    def stamp(self, *_) -> None:
        """A time stamp now (after a CUDA synchronize); a loop without an optimizer calls it itself."""
        sync()
        self.stamps.append(time.perf_counter())
        self.device_used.append(device_used_gib())

    @contextlib.contextmanager
    def counting(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        handle = register_optimizer_step_post_hook(self.stamp)
        try:
            yield
        finally:
            handle.remove()

    def summary(self) -> dict:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]   # from the end of the first step
        used = [u for u in self.device_used if u is not None]
        return {"s_per_step": statistics.median(gaps) if gaps else None, "steps_timed": len(gaps),
                "device_used_at_steps_max_gib": max(used) if used else None,
                "flags_seen": self.flags[0] if self.flags else {},
                "flags_constant": all(f == self.flags[0] for f in self.flags)}


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def adapter_gap(a, b) -> float:
    """The largest absolute difference between two training results' adapters (every factor)."""
    return max(float((getattr(x, part).float() - getattr(y, part).float()).abs().max())
               for name in a.weights.adapters
               for x, y in zip(a.weights.adapters[name], b.weights.adapters[name]) for part in ("down", "up"))


@contextlib.contextmanager
def ballast(free_bytes: int | None):
    """Hold device memory for the block so that ComfyUI sees ``free_bytes`` free
    (``get_free_memory``: the driver's free memory plus what PyTorch's allocator holds unused), as
    on a card with that much room. Yields the bytes held: 0 without CUDA or with ``free_bytes``
    None. What ComfyUI then sees is for the caller to read (it may differ by the allocator's
    rounding)."""
    import comfy.model_management as mm

    if free_bytes is None or not torch.cuda.is_available():
        yield 0
        return
    device = mm.get_torch_device()
    mm.soft_empty_cache()
    size = max(0, int(mm.get_free_memory(device) - free_bytes))
    held = torch.empty(size, dtype=torch.uint8, device=device) if size else None
    try:
        yield size
    finally:
        del held
        mm.soft_empty_cache()


@contextlib.contextmanager
def train_memory():
    """``bench/train_memory.py``, imported for the block: it puts the repository first on sys.path
    and sets ComfyUI's attention kernel, both put back afterwards."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention as attention

    saved = list(sys.path), attention.optimized_attention, comfy.ldm.flux.math.optimized_attention
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import train_memory as module

        yield module
    finally:
        sys.path[:] = saved[0]
        attention.optimized_attention, comfy.ldm.flux.math.optimized_attention = saved[1:]


class SamplerClock:
    """Seconds of ComfyUI's sampler loop (SAMPLER_SAMPLE wrapper: after load and patching)."""

    def __init__(self, patcher) -> None:
        import comfy.patcher_extension

        self.seconds = 0.0
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, "gpu_check", self._timed)

    def _timed(self, executor, *args, **kwargs):
        sync()
        start = time.perf_counter()
        try:
            return executor(*args, **kwargs)
        finally:
            sync()
            self.seconds = time.perf_counter() - start


class Budget:
    """The time guard: a section runs only if its estimate fits in what is left (the estimate: the
    caller's, else its time on the previous family, ``first_estimate_s`` before one has run it).
    ``reserved_s`` is kept back for a later part of the run while it is set."""

    def __init__(self, limit_s: float, first_estimate_s: float = 0.0) -> None:
        self.limit_s, self.start = limit_s, time.perf_counter()
        self.first_estimate_s = first_estimate_s
        self.reserved_s = 0.0
        self.taken: dict[str, float] = {}   # section -> seconds, last family that ran it
        self.skipped: list[str] = []

    def used(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.limit_s - self.used() - self.reserved_s

    def run(self, record: dict, family: str, name: str, fn, estimate_s: float | None = None) -> dict | None:
        """``record[name] = fn()`` with its status, or a skip note; a failure is recorded, not raised."""
        estimate, left = self.taken.get(name, self.first_estimate_s), self.left()
        if estimate_s is not None:
            estimate = estimate_s
        if left <= 0 or estimate > left:
            why = f"this section is given {estimate:.0f} s" if estimate_s is not None else \
                f"this section took {estimate:.0f} s on the previous family" if name in self.taken else \
                f"a first section is given {estimate:.0f} s"
            kept = f" ({self.reserved_s:.0f} s kept for a later part)" if self.reserved_s else ""
            note = f"skipped: the {self.limit_s:.0f} s budget has {max(left, 0):.0f} s left{kept}" + \
                (f", {why}" if estimate else "")
            record[name] = {"status": "skipped", "note": note}
            self.skipped.append(f"{family}.{name}")
            return None
        start = time.perf_counter()
        try:
            record[name] = {"status": "ran", **fn()}
        except Exception as err:  # recorded: one failing section must not lose the others' figures
            record[name] = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:400]}
        self.taken[name] = record[name]["seconds"] = time.perf_counter() - start
        return record[name]
