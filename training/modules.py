"""Trainable adapters and the forward hooks that add them to the frozen model during training.

Per adapted Linear (or row range of a fused Linear) and per sample b with mask ``m_b = M_{t_b}``:

- T-LoRA / Ortho-LoRA (paper Eq. 8): ``delta = B diag(S m_b) A x - B0 diag(S0 m_b) A0 x``; A, B, S
  train, ``A0 = A_init``, ``B0``, ``S0`` are frozen copies of the Ortho init, so delta is exactly 0
  at step 0 under every mask (the two terms are computed by the same operations on bitwise equal
  factors).
- Vanilla T-LoRA (Eq. 5): ``delta = up diag(m_b) down x``; plain LoRA: no mask.

Ortho-LoRA without mask and plain LoRA use ``m_b = 1``. When every sample of a step has the same
active rank (always at batch size 1) the mask is applied by slicing the factors to their first
r(t) columns instead: same values, fewer FLOPs. The adapter math runs in float32 whatever the base
model's dtype and is cast to the layer output's dtype once, after the addition, as in
:mod:`tlora_core.apply`.

``export`` turns a trained adapter into the :class:`LowRankAdapter` the Loader uses:
``down = [A; A0]``, ``up = [B S | -B0 S0]``, ``parts = 2`` (Ortho) or ``down``, ``up`` (Vanilla / LoRA).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..tlora_core.adapter import LowRankAdapter, RankSchedule, lowrank_delta
from ..tlora_core.init import ortho_init, vanilla_init
from ..tlora_core.schedule import active_rank, rank_mask
from .targets import TrainTarget

ORTHO_VARIANTS = ("tlora", "ortho")
MASKED_VARIANTS = ("tlora", "vanilla")
ADAPTER_DTYPE = torch.float32


def adapter_key(target: TrainTarget) -> str:
    """A stable name for one adapter: ``module`` or ``module@start:stop`` for a row range."""
    if target.out_rows is None:
        return target.module
    return f"{target.module}@{target.out_rows[0]}:{target.out_rows[1]}"


class TrainableAdapter(torch.nn.Module):
    """One adapter's trainable factors (float32) and, for Ortho variants, its frozen init."""

    def __init__(self, target: TrainTarget, variant: str, rank: int, generator: torch.Generator,
                 ortho_mode: str = "fast") -> None:
        super().__init__()
        self.target = target
        self.variant = variant
        self.ortho = variant in ORTHO_VARIANTS
        # Drawn on the CPU from a seeded generator: the same seed gives the same init on any device.
        if self.ortho:
            f = ortho_init(target.rows, target.in_features, rank, mode=ortho_mode, generator=generator,
                           dtype=ADAPTER_DTYPE)
            self.A = torch.nn.Parameter(f.A.detach().clone())
            self.B = torch.nn.Parameter(f.B.detach().clone())
            self.S = torch.nn.Parameter(f.S.detach().clone().reshape(-1))
            self.register_buffer("A_init", f.A.detach().clone())
            self.register_buffer("B_init", f.B.detach().clone())
            self.register_buffer("S_init", f.S.detach().clone().reshape(-1))
        else:
            down, up = vanilla_init(target.rows, target.in_features, rank, generator=generator,
                                    dtype=ADAPTER_DTYPE)
            self.down = torch.nn.Parameter(down.detach().clone())
            self.up = torch.nn.Parameter(up.detach().clone())

    @property
    def parts(self) -> int:
        return 2 if self.ortho else 1

    def delta(self, x: torch.Tensor, mask: torch.Tensor | None = None,
              rank: int | None = None) -> torch.Tensor:
        """(B, ..., rows) float32 delta for layer input ``x``.

        ``rank``: keep only the first ``rank`` columns, by slicing the factors (fewer FLOPs, and the
        dropped columns get exactly zero gradient by construction). ``mask`` (B, kept columns):
        per-sample mask of the kept columns. Neither: every column.
        """
        x = x.to(ADAPTER_DTYPE)
        cut = slice(None) if rank is None else slice(0, rank)
        if not self.ortho:
            return lowrank_delta(x, self.down[cut], self.up[:, cut], mask)
        # Two separate terms, not one product over [A; A_init]: bitwise equal at init (so exactly
        # zero), and the frozen term builds no autograd graph where x needs no gradient.
        trained = lowrank_delta(x, self.A[cut], self.B[:, cut], mask, scale=self.S[cut])
        frozen = lowrank_delta(x, self.A_init[cut], self.B_init[:, cut], mask, scale=self.S_init[cut])
        return trained - frozen

    @torch.no_grad()
    def export(self, schedule: RankSchedule | None, rank_index: torch.Tensor) -> LowRankAdapter:
        """The Loader's representation of this adapter (float32 CPU copies)."""
        if self.ortho:
            down = torch.cat([self.A, self.A_init])
            up = torch.cat([self.B * self.S, -(self.B_init * self.S_init)], dim=1)
        else:
            down, up = self.down, self.up
        return LowRankAdapter(down.detach().to("cpu", ADAPTER_DTYPE).clone(),
                              up.detach().to("cpu", ADAPTER_DTYPE).clone(), rank_index, schedule,
                              self.parts, self.target.out_rows)


class StepMasks:
    """The per-sample rank masks of the current training step, shared by every adapter.

    ``set(timesteps)`` computes ``M_{t_b}`` once per step (paper Eq. 6 with the reference exponent);
    it stays valid until ``clear`` so gradient checkpointing recomputes identical forwards. When all
    samples share one active rank (always at batch size 1) it is kept as that rank, and adapters
    slice their factors instead of multiplying by a mask.
    """

    def __init__(self, schedule: RankSchedule | None, device: torch.device) -> None:
        self.schedule = schedule
        self.device = device
        self._mask: torch.Tensor | None = None
        self._rank: int | None = None
        if schedule is not None:
            self._rank_index = torch.arange(schedule.rank, device=device)

    def set(self, timesteps: torch.Tensor) -> None:
        self.clear()
        if self.schedule is None:
            return
        s = self.schedule
        active = active_rank(timesteps, s.rank, s.min_rank, s.power, s.T).cpu()
        # Columns at or beyond the batch's largest active rank are masked for every sample: slice
        # them away, and mask only the columns in between per sample.
        self._rank = int(active.max())
        if not bool((active == active[0]).all()):
            self._mask = rank_mask(active.to(self.device), self._rank_index[:self._rank], ADAPTER_DTYPE)

    def clear(self) -> None:
        self._mask = None
        self._rank = None

    def get(self) -> tuple[torch.Tensor | None, int | None]:
        """``(mask (B, r_max) or None, r_max)``: adapters keep the first ``r_max`` (the batch's
        largest active rank) columns, and multiply them by the per-sample mask when the samples'
        ranks differ; (None, None) if unmasked."""
        if self.schedule is None:
            return None, None
        if self._mask is None and self._rank is None:
            raise RuntimeError("T-LoRA training: a layer ran outside a training step (no timesteps set)")
        return self._mask, self._rank


def _add_rows(output: torch.Tensor, deltas: list[tuple[tuple[int, int] | None, torch.Tensor]]) -> torch.Tensor:
    """``output + sum of deltas`` placed on their row ranges, summed in float32, cast back once."""
    width = output.shape[-1]
    if len(deltas) == 1 and deltas[0][0] is None:
        full = deltas[0][1]
    else:
        pieces, pos = [], 0
        lead = deltas[0][1].shape[:-1]
        for rows, d in sorted(deltas, key=lambda item: (item[0] or (0, width))[0]):
            start, stop = rows or (0, width)
            if start < pos:
                raise ValueError(f"adapter rows {rows} overlap another adapter on the same layer")
            if start > pos:
                pieces.append(d.new_zeros(*lead, start - pos))
            pieces.append(d)
            pos = stop
        if pos < width:
            pieces.append(pieces[-1].new_zeros(*lead, width - pos))
        full = torch.cat(pieces, dim=-1)
    return (output.to(full.dtype) + full).to(output.dtype)


class AdapterSet(torch.nn.Module):
    """Every trainable adapter of one run, in target order, and their forward hooks."""

    def __init__(self, targets: Iterable[TrainTarget], variant: str, rank: int, seed: int,
                 ortho_mode: str = "fast") -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(int(seed))
        self.targets = list(targets)
        self.variant = variant
        self.rank = rank
        self.adapters = torch.nn.ModuleList(
            TrainableAdapter(t, variant, rank, generator, ortho_mode) for t in self.targets)
        self._handles: list = []

    def keys(self) -> list[str]:
        return [adapter_key(t) for t in self.targets]

    def by_module(self) -> dict[str, list[TrainableAdapter]]:
        groups: dict[str, list[TrainableAdapter]] = {}
        for adapter in self.adapters:
            groups.setdefault(adapter.target.module, []).append(adapter)
        return groups

    def attach(self, diffusion_model: torch.nn.Module, masks: StepMasks) -> None:
        """Register one forward hook per adapted module (idempotent per run: detach first)."""
        self.detach()
        for name, group in self.by_module().items():
            module = diffusion_model.get_submodule(name)
            self._handles.append(module.register_forward_hook(_training_hook(group, masks)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def export(self, schedule: RankSchedule | None) -> dict[str, list[LowRankAdapter]]:
        """``{module: [LowRankAdapter]}`` for :class:`TLoRAWeights`; one shared rank_index tensor
        per column layout, so the Loader computes each mask once per model call."""
        index_by_parts = {p: torch.arange(self.rank).repeat(p) for p in (1, 2)}
        return {name: [a.export(schedule, index_by_parts[a.parts]) for a in group]
                for name, group in self.by_module().items()}


def _training_hook(group: list[TrainableAdapter], masks: StepMasks):
    def forward_hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        mask, rank = masks.get()
        deltas = [(a.target.out_rows, a.delta(x, mask, rank)) for a in group]
        return _add_rows(output, deltas)

    return forward_hook
