"""One low-rank adapter representation for every variant, and its forward math.

For an input ``x`` (B, ..., m) the adapter adds to the base output (B, ..., n)::

    delta(x, mask) = sum_p  up_p @ diag(mask_b[P_p]) @ down_p @ x_b          (per sample b)

``down`` (k, m) and ``up`` (n_out, k) hold k columns split into ``parts`` equal contiguous parts whose
outputs are computed separately and then summed; ``rank_index`` (k,) says which schedule rank each
column belongs to, and the mask keeps the columns with ``rank_index < r(t)``. The variants:

- Vanilla T-LoRA (paper Eq. 5, ``W + B M_t A``): ``down = A``, ``up = B``, ``rank_index = 0..r-1``.
- Ortho-LoRA / T-LoRA (Eq. 8, ``W - B_init S_init M_t A_init + B S M_t A``): ``parts = 2``,
  ``down = [A; A_init]``, ``up = [B S | -B_init S_init]``, ``rank_index = [0..r-1, 0..r-1]``. The two
  parts are computed the same way and differ only in sign when the trained factors equal their
  init, so the output is exactly zero at init under every mask (negation commutes with rounding).
- Plain LoRA: ``schedule = None`` (no mask), or a re-factored LoRA with a schedule.
- Fused layers (FLUX ``img_attn.qkv``, ``linear1``): several adapters on one module, each writing
  the output rows ``out_rows`` of its own projection; or one adapter with a block-diagonal ``up``.

The math runs in the adapter's own dtype (float32 by default) and the result is cast to the base
output's dtype, so fp16 / bf16 / fp8 bases lose no precision in the Ortho difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .schedule import DEFAULT_T, validate_schedule

VARIANTS = ("tlora", "vanilla", "ortho", "lora")
"""tlora = Ortho init + rank mask (the paper's T-LoRA); vanilla = Vanilla T-LoRA (mask, no Ortho);
ortho = Ortho-LoRA without mask; lora = plain LoRA."""


@dataclass(frozen=True)
class RankSchedule:
    """Parameters of ``r(t)`` (see :mod:`tlora_core.schedule`). Hashable: a cache key per call."""

    rank: int
    min_rank: int
    power: float = 1.0
    T: int = DEFAULT_T

    def __post_init__(self) -> None:
        validate_schedule(self.rank, self.min_rank, self.power, self.T)


@dataclass(eq=False)
class LowRankAdapter:
    """A low-rank term on one Linear module; see the module docstring for the math."""

    down: torch.Tensor                     # (k, m)
    up: torch.Tensor                       # (n_out, k), any per-column scale folded in
    rank_index: torch.Tensor               # (k,) int64
    schedule: RankSchedule | None = None   # None: no mask, every column always active
    parts: int = 1
    out_rows: tuple[int, int] | None = None  # rows [start, stop) of the module's output; None = all
    _device_copies: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        k = self.down.shape[0]
        if self.down.ndim != 2 or self.up.ndim != 2 or self.up.shape[1] != k:
            raise ValueError(f"adapter shapes do not fit: down {tuple(self.down.shape)}, "
                             f"up {tuple(self.up.shape)} (need down (k, in), up (out, k))")
        if self.rank_index.shape != (k,):
            raise ValueError(f"rank_index has shape {tuple(self.rank_index.shape)}, need ({k},)")
        if self.parts < 1 or k % self.parts:
            raise ValueError(f"{k} columns cannot be split into {self.parts} equal parts")
        if self.out_rows is not None:
            start, stop = self.out_rows
            if stop - start != self.up.shape[0]:
                raise ValueError(f"out_rows {self.out_rows} do not match up's {self.up.shape[0]} rows")

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def columns(self) -> int:
        return self.down.shape[0]

    def layout_key(self) -> tuple:
        """Adapters with equal keys share one mask per model call."""
        return (self.schedule, self.rank_index.data_ptr(), self.columns)

    def tensors_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(down, up, rank_index) on ``device``; copies are cached so offloaded models move once.

        Outside inference mode, tensors made under it (a Loader node reads files under ComfyUI's
        ``torch.inference_mode()``) come as ordinary copies, made once: a T-LoRA Train run on a
        MODEL that carries this adapter records it in autograd, which cannot save inference tensors
        for backward.
        """
        ordinary = self.down.is_inference() and not torch.is_inference_mode_enabled()
        if self.down.device == device and not ordinary:
            return self.down, self.up, self.rank_index
        key = (str(device), ordinary)
        if key not in self._device_copies:
            copies = (self.down.to(device), self.up.to(device), self.rank_index.to(device))
            if ordinary:
                copies = tuple(t.clone() if t.is_inference() else t for t in copies)
            self._device_copies[key] = copies
        return self._device_copies[key]

    def release_device_copies(self) -> None:
        self._device_copies.clear()


def lowrank_delta(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                  mask: torch.Tensor | None = None, parts: int = 1) -> torch.Tensor:
    """``sum_p up_p @ diag(mask_b) @ down_p @ x_b`` in ``down``'s dtype.

    Args:
        x: (B, ..., m) input of the base layer (any float dtype; converted to ``down``'s dtype).
        down: (k, m). up: (n, k).
        mask: optional (B, k) or (1, k) per-sample column mask.
        parts: number of equal contiguous column parts whose outputs are summed separately.
    Returns:
        (B, ..., n) in ``down``'s dtype.
    """
    h = torch.nn.functional.linear(x.to(down.dtype), down)
    if mask is not None:
        if mask.shape[0] not in (1, h.shape[0]):
            raise ValueError(f"mask has {mask.shape[0]} samples but the layer input has "
                             f"{h.shape[0]}; per-sample masks need matching batch sizes")
        h = h * mask.to(h.dtype).reshape(mask.shape[0], *([1] * (h.ndim - 2)), mask.shape[-1])
    if parts == 1:
        return torch.nn.functional.linear(h, up)
    k = down.shape[0] // parts
    out = None
    for p in range(parts):
        term = torch.nn.functional.linear(h[..., p * k:(p + 1) * k], up[:, p * k:(p + 1) * k])
        out = term if out is None else out + term
    return out


def add_delta(base_out: torch.Tensor, delta: torch.Tensor, strength: float,
              out_rows: tuple[int, int] | None = None) -> torch.Tensor:
    """``base_out + strength * delta`` (on ``out_rows`` only, if given), cast to base_out's dtype.

    The sum is formed in the delta's (higher) precision before the single cast back.
    """
    if out_rows is None:
        return (base_out.to(delta.dtype) + strength * delta).to(base_out.dtype)
    start, stop = out_rows
    out = base_out.clone()
    out[..., start:stop] = (base_out[..., start:stop].to(delta.dtype) + strength * delta).to(base_out.dtype)
    return out
