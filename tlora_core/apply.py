"""Applying adapters in the forward pass with a per-sample rank mask (pure torch).

``RankState`` holds the timesteps of the current model call, one per sample. Masks are computed
from them once per call and per distinct (schedule, column layout), then shared by every layer,
so a layer's forward hook does no host-device synchronisation. ``attach`` registers forward hooks
that add ``strength * delta(x, mask)`` to each target module's output; ``detach`` removes them,
which restores the modules exactly.

When every sample of a call has the same active rank (the usual case: cond and uncond share a
sigma) and an adapter's columns hold ranks 0, 1, ... in order within each part, the hook slices
the factors to the active columns instead of multiplying by a mask: the masked columns' work is
skipped, and the result is the same sum (zero columns contribute exactly zero). A float32 layer
output is updated in place (it is fresh from the layer) unless autograd records the call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch

from .adapter import LowRankAdapter, RankSchedule, add_delta, lowrank_delta
from .schedule import active_rank, rank_mask

log = logging.getLogger(__name__)


class RankState:
    """Per-call timesteps and the masks derived from them. One instance per applied T-LoRA."""

    def __init__(self) -> None:
        self.timesteps: torch.Tensor | None = None
        self._active: dict[RankSchedule, torch.Tensor] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self._uniform: dict[RankSchedule, int | None] = {}
        self._host_timesteps: torch.Tensor | None = None
        self._warned_unset = False
        self._holds = 0

    def set(self, timesteps: torch.Tensor | None) -> None:
        """Start a model call at these per-sample timesteps (None: every column active)."""
        self.timesteps = None if timesteps is None else timesteps.detach().reshape(-1)
        # One host copy per call (not per layer), for uniform_rank.
        self._host_timesteps = None if timesteps is None else self.timesteps.to("cpu", torch.float64)
        self._active.clear()
        self._masks.clear()
        self._uniform.clear()

    def clear(self) -> None:
        self.set(None)

    @contextmanager
    def at(self, timesteps: torch.Tensor | None):
        """``with state.at(t): model(x)`` sets the timesteps for one call and always clears them
        (at the end of the outermost ``hold`` if one is open)."""
        self.set(timesteps)
        try:
            yield self
        finally:
            if not self._holds:
                self.clear()

    @contextmanager
    def hold(self):
        """Keep the timesteps of the calls made inside this block until it ends. For training on a
        MODEL that carries this T-LoRA: gradient checkpointing re-runs its layers during backward,
        after the call, and they must see that call's masks again."""
        self._holds += 1
        try:
            yield self
        finally:
            self._holds -= 1
            if not self._holds:
                self.clear()

    def active(self, schedule: RankSchedule) -> torch.Tensor | None:
        if self.timesteps is None:
            return None
        if schedule not in self._active:
            self._active[schedule] = active_rank(self.timesteps, schedule.rank, schedule.min_rank,
                                                 schedule.power, schedule.T)
        return self._active[schedule]

    def uniform_rank(self, schedule: RankSchedule) -> int | None:
        """The active rank if every sample of this call has the same one, else None (also None
        outside a call). Computed on the host once per call and schedule."""
        if self._host_timesteps is None:
            return None
        if schedule not in self._uniform:
            ranks = active_rank(self._host_timesteps, schedule.rank, schedule.min_rank,
                                schedule.power, schedule.T)
            self._uniform[schedule] = int(ranks[0]) if bool((ranks == ranks[0]).all()) else None
        return self._uniform[schedule]

    def mask_for(self, adapter: LowRankAdapter, rank_index: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor | None:
        """(B, k) mask for this adapter's columns, or None when no mask applies."""
        if adapter.schedule is None:
            return None
        if self.timesteps is None:
            if not self._warned_unset:
                log.debug("T-LoRA layer called outside a sampling step: using every rank")
                self._warned_unset = True
            return None
        key = (*adapter.layout_key(), rank_index.device, dtype)
        mask = self._masks.get(key)
        if mask is None:
            active = self.active(adapter.schedule)
            mask = rank_mask(active.to(rank_index.device), rank_index, dtype)
            self._masks[key] = mask
        return mask


def _prefix_columns(adapter: LowRankAdapter) -> int | None:
    """Columns per part if each part's rank_index is 0, 1, 2, ... (so the active columns of rank r
    are the first r of every part), else None."""
    if adapter.schedule is None:
        return None
    per_part = adapter.columns // adapter.parts
    expected = torch.arange(per_part).repeat(adapter.parts)
    return per_part if torch.equal(adapter.rank_index.cpu(), expected) else None


def _sliced_delta(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, parts: int, per_part: int,
                  active: int) -> torch.Tensor:
    """``lowrank_delta`` with every sample at the same rank: only the first ``active`` columns of
    each part are computed (views, no copies)."""
    if active >= per_part:
        return lowrank_delta(x, down, up, None, parts)
    out = None
    for p in range(parts):
        cols = slice(p * per_part, p * per_part + active)
        term = lowrank_delta(x, down[cols], up[:, cols])
        out = term if out is None else out + term
    return out


def _hook(adapters: list[LowRankAdapter], state: RankState, strength: float):
    per_part = [_prefix_columns(a) for a in adapters]

    def forward_hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if strength == 0:
            return output
        x = args[0]
        for adapter, columns in zip(adapters, per_part):
            down, up, rank_index = adapter.tensors_on(x.device)
            active = None if columns is None else state.uniform_rank(adapter.schedule)
            if active is not None:
                delta = _sliced_delta(x, down, up, adapter.parts, columns, active)
            else:
                mask = state.mask_for(adapter, rank_index, down.dtype)
                delta = lowrank_delta(x, down, up, mask, adapter.parts)
            output = _accumulate(output, delta, strength, adapter.out_rows)
        return output

    return forward_hook


def _accumulate(output: torch.Tensor, delta: torch.Tensor, strength: float,
                out_rows: tuple[int, int] | None) -> torch.Tensor:
    """``add_delta``, in place on the layer's fresh output when no cast and no autograd is
    involved: no full-size temporaries, and no copy of a fused layer's whole output per adapter."""
    if output.dtype != delta.dtype or output.requires_grad or delta.requires_grad:
        return add_delta(output, delta, strength, out_rows)
    target = output if out_rows is None else output[..., out_rows[0]:out_rows[1]]
    target.add_(delta, alpha=strength)
    return output


def attach(modules: Mapping[str, torch.nn.Module], adapters: Mapping[str, list[LowRankAdapter]],
           state: RankState, strength: float = 1.0) -> list[torch.utils.hooks.RemovableHandle]:
    """Register one forward hook per adapted module. Raises KeyError naming missing modules
    before registering anything, so nothing is half-applied."""
    missing = [name for name in adapters if name not in modules]
    if missing:
        raise KeyError(f"{len(missing)} adapter target(s) are not modules of this model, "
                       f"e.g. {missing[:3]}")
    return [modules[name].register_forward_hook(_hook(list(group), state, float(strength)))
            for name, group in adapters.items()]


def detach(handles: Iterable[torch.utils.hooks.RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
