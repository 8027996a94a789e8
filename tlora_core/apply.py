"""Applying adapters in the forward pass with a per-sample rank mask (pure torch).

``RankState`` holds the timesteps of the current model call, one per sample. Masks are computed
from them once per call and per distinct (schedule, column layout), then shared by every layer,
so a layer's forward hook does no host-device synchronisation. ``attach`` registers forward hooks
that add ``strength * delta(x, mask)`` to each target module's output; ``detach`` removes them,
which restores the modules exactly.
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
        self._warned_unset = False

    def set(self, timesteps: torch.Tensor | None) -> None:
        """Start a model call at these per-sample timesteps (None: every column active)."""
        self.timesteps = None if timesteps is None else timesteps.detach().reshape(-1)
        self._active.clear()
        self._masks.clear()

    def clear(self) -> None:
        self.set(None)

    @contextmanager
    def at(self, timesteps: torch.Tensor | None):
        """``with state.at(t): model(x)`` sets the timesteps for one call and always clears them."""
        self.set(timesteps)
        try:
            yield self
        finally:
            self.clear()

    def active(self, schedule: RankSchedule) -> torch.Tensor | None:
        if self.timesteps is None:
            return None
        if schedule not in self._active:
            self._active[schedule] = active_rank(self.timesteps, schedule.rank, schedule.min_rank,
                                                 schedule.power, schedule.T)
        return self._active[schedule]

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


def _hook(adapters: list[LowRankAdapter], state: RankState, strength: float):
    def forward_hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if strength == 0:
            return output
        x = args[0]
        for adapter in adapters:
            down, up, rank_index = adapter.tensors_on(x.device)
            mask = state.mask_for(adapter, rank_index, down.dtype)
            delta = lowrank_delta(x, down, up, mask, adapter.parts)
            output = add_delta(output, delta, strength, adapter.out_rows)
        return output

    return forward_hook


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
