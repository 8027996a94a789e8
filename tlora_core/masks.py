"""The per-call rank mask of a T-LoRA (paper Eq. 6): one mechanism for the Loader and the trainer.

``RankState`` holds the timesteps of the current model call (Loader) or training step (trainer),
one per sample, and derives from them, once per call and per schedule, a :class:`ColumnPlan`:
keep the first ``keep`` columns of each part (the batch's largest active rank ``r(t)``) and, when
the samples' ranks differ, multiply those by a per-sample 0/1 mask. Columns at or beyond ``keep``
are masked for every sample, so they are sliced away instead of multiplied by zero: the same sum,
fewer FLOPs. Adapters whose columns are not 0, 1, 2, ... within each part use :meth:`mask_for`, a
mask over all their columns. Every layer reads the same cached plan, so no layer synchronises
with the host.

Options for training:

- ``strict=True``: a layer that runs outside a call / step raises instead of using every rank;
- :meth:`hold`: keeps the timesteps through gradient checkpointing, which re-runs the layers in
  backward, after the call, where they must see that call's masks again. The trainer's own state
  is set for a whole step (:meth:`set` ... :meth:`clear`), which covers the same need.

Masks carry no gradient; the trainer's factors keep theirs (slicing is a view).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .adapter import LowRankAdapter, RankSchedule
from .schedule import active_rank, rank_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ColumnPlan:
    """``keep`` leading columns per part; ``mask`` (B, keep) 0/1 per sample, or None (all on)."""

    keep: int
    mask: torch.Tensor | None


class RankState:
    """Per-call timesteps and the plans and masks derived from them; one per applied T-LoRA (and
    one per training run)."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.timesteps: torch.Tensor | None = None
        self._host_timesteps: torch.Tensor | None = None
        self._active: dict[RankSchedule, torch.Tensor] = {}
        self._host_ranks: dict[RankSchedule, torch.Tensor] = {}
        self._plans: dict[tuple, ColumnPlan] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self._warned_unset = False
        self._holds = 0

    def set(self, timesteps: torch.Tensor | None) -> None:
        """Start a model call (or training step) at these per-sample timesteps (None: unset)."""
        self.timesteps = None if timesteps is None else timesteps.detach().reshape(-1)
        # One host copy per call (not per layer), for the plans.
        self._host_timesteps = None if timesteps is None else self.timesteps.to("cpu", torch.float64)
        self._active.clear()
        self._host_ranks.clear()
        self._plans.clear()
        self._masks.clear()

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
        """Keep the timesteps of the calls made inside this block until it ends (see the module
        docstring: gradient checkpointing re-runs layers after the call)."""
        self._holds += 1
        try:
            yield self
        finally:
            self._holds -= 1
            if not self._holds:
                self.clear()

    def _unset(self) -> None:
        if self.strict:
            raise RuntimeError("T-LoRA training: a layer ran outside a training step (no timesteps set)")
        if not self._warned_unset:
            log.debug("T-LoRA layer called outside a sampling step: using every rank")
            self._warned_unset = True

    def _ranks_on_host(self, schedule: RankSchedule) -> torch.Tensor:
        if schedule not in self._host_ranks:
            self._host_ranks[schedule] = active_rank(self._host_timesteps, schedule.rank,
                                                     schedule.min_rank, schedule.power, schedule.T)
        return self._host_ranks[schedule]

    def plan(self, schedule: RankSchedule | None, device: torch.device) -> ColumnPlan | None:
        """The column plan of this call for adapters with ``schedule`` whose columns are the ranks
        0, 1, ... within each part; None when no mask applies (no schedule, or outside a call)."""
        if schedule is None:
            return None
        if self._host_timesteps is None:
            self._unset()
            return None
        key = (schedule, str(device))
        plan = self._plans.get(key)
        if plan is None:
            ranks = self._ranks_on_host(schedule)
            keep = int(ranks.max())
            mask = None
            if not bool((ranks == ranks[0]).all()):
                mask = rank_mask(self.active(schedule).to(device), torch.arange(keep, device=device))
                self._masks[("plan", *key)] = mask
            plan = self._plans[key] = ColumnPlan(keep, mask)
        return plan

    def uniform_rank(self, schedule: RankSchedule) -> int | None:
        """The active rank if every sample of this call has the same one, else None (also None
        outside a call)."""
        if self._host_timesteps is None:
            return None
        ranks = self._ranks_on_host(schedule)
        return int(ranks[0]) if bool((ranks == ranks[0]).all()) else None

    def active(self, schedule: RankSchedule) -> torch.Tensor | None:
        """(B,) active rank per sample on the timesteps' device, or None outside a call."""
        if self.timesteps is None:
            return None
        if schedule not in self._active:
            self._active[schedule] = active_rank(self.timesteps, schedule.rank, schedule.min_rank,
                                                 schedule.power, schedule.T)
        return self._active[schedule]

    def mask_for(self, adapter: LowRankAdapter, rank_index: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor | None:
        """(B, k) mask over all of this adapter's columns, or None when no mask applies."""
        if adapter.schedule is None:
            return None
        if self.timesteps is None:
            self._unset()
            return None
        key = (*adapter.layout_key(), rank_index.device, dtype)
        mask = self._masks.get(key)
        if mask is None:
            active = self.active(adapter.schedule)
            mask = rank_mask(active.to(rank_index.device), rank_index, dtype)
            self._masks[key] = mask
        return mask
