"""Trainable adapters and the forward hooks that add them to the frozen model during training.

Per adapted Linear (or row range of a fused Linear) and per sample b with mask ``m_b = M_{t_b}``:

- T-LoRA / Ortho-LoRA (paper Eq. 8): ``delta = B diag(S m_b) A x - B0 diag(S0 m_b) A0 x``; A, B, S
  train, ``A0 = A_init``, ``B0``, ``S0`` are frozen copies of the Ortho init.
- Vanilla T-LoRA (Eq. 5): ``delta = up diag(m_b) down x``; plain LoRA: no mask.

Ortho-LoRA without mask and plain LoRA use ``m_b = 1``. The masks are the Loader's mechanism,
:class:`tlora_core.masks.RankState` (strict, set for the whole step): its column plan slices the
factors to the batch's largest active rank (at batch size 1 the only one) and masks per sample
only the columns in between, so the same values cost fewer FLOPs. The adapter math runs in float32 whatever the base
model's dtype and is cast to the layer output's dtype once, after the addition, as in
:mod:`tlora_core.apply`.

The Ortho delta is computed as ONE low-rank product of rank 2r, written with differences from the
init (``U = B S``, ``U0 = B0 S0``)::

    delta = [U - U0 | U0] diag([m_b | m_b]) [A; A - A0] x

which equals Eq. 8 and is exactly zero at init by construction (``U - U0`` and ``A - A0`` are
exactly zero there, whatever order a GEMM sums in). These per-step factors depend on the
parameters only, so :meth:`AdapterSet.begin_step` builds them once per training step, for every
adapter in one autograd node (:mod:`.ortho_factors`), outside any checkpointed block; each layer
then costs what a plain LoRA of rank 2r costs. The price is memory: the factors (twice the size of A and B, fp32) live
through the step and their gradients gather in its backward.

``export`` turns a trained adapter into the :class:`LowRankAdapter` the Loader uses:
``down = [A; A0]``, ``up = [B S | -B0 S0]``, ``parts = 2`` (Ortho) or ``down``, ``up`` (Vanilla / LoRA).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..tlora_core.adapter import LowRankAdapter, RankSchedule, lowrank_delta
from ..tlora_core.init import ortho_init, vanilla_init
from ..tlora_core.masks import RankState
from .ortho_factors import OrthoStepFactors, ortho_factors
from .targets import TrainTarget

ORTHO_VARIANTS = ("tlora", "ortho")
MASKED_VARIANTS = ("tlora", "vanilla")
ADAPTER_DTYPE = torch.float32


def adapter_key(target: TrainTarget) -> str:
    """A stable name for one adapter: ``module`` or ``module@start:stop`` for a row range."""
    if target.out_rows is None:
        return target.module
    return f"{target.module}@{target.out_rows[0]}:{target.out_rows[1]}"


def adapter_memory(targets: Iterable[TrainTarget], variant: str, rank: int,
                   optimizer_copies: int = 2) -> dict[str, int]:
    """What a run's adapters need on the device (fp32): ``state_bytes`` for the parameters, their
    gradients and the optimizer's ``optimizer_copies`` parameter-sized buffers (AdamW's two
    moments; :data:`training.optim.STATE_COPIES`) (and the frozen init of the Ortho variants), and
    ``step_factor_bytes`` for one step's Ortho factors (2 x rank columns) and their gradients."""
    ortho = variant in ORTHO_VARIANTS
    params = factors = 0
    for t in targets:
        params += rank * (t.rows + t.in_features) + (rank if ortho else 0)
        factors += 2 * rank * (t.rows + t.in_features) if ortho else 0
    copies = 2 + optimizer_copies + (1 if ortho else 0)
    size = ADAPTER_DTYPE.itemsize
    return {"trainable_params": params, "state_bytes": size * params * copies,
            "step_factor_bytes": size * 2 * factors}


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
        # factors(rank) of the current training step's rank, set by AdapterSet.begin_step.
        self.step_factors: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def parts(self) -> int:
        return 2 if self.ortho else 1

    def factors(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down, up)`` of this step's low-rank product, keeping the first ``rank`` columns
        (all if None), with autograd back to the parameters. Ortho: 2 x rank columns, see the
        module docstring; the dropped columns get exactly zero gradient by construction."""
        if not self.ortho:
            if rank is None or rank == self.down.shape[0]:
                return self.down, self.up
            return self.down[:rank], self.up[:, :rank]
        return ortho_factors(self.A, self.B, self.S, self.A_init, self.B_init, self.S_init, rank)

    def delta(self, x: torch.Tensor, mask: torch.Tensor | None = None, rank: int | None = None,
              factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, ..., rows) float32 delta for layer input ``x``.

        ``rank``: keep only the first ``rank`` columns (by slicing the factors). ``mask`` (B, kept
        columns): per-sample mask of the kept columns. Neither: every column. ``factors``: this
        step's ``factors(rank)``, built once per step (see :meth:`AdapterSet.begin_step`).
        """
        down, up = self.factors(rank) if factors is None else factors
        if mask is not None and self.ortho:
            mask = mask.repeat(1, 2)
        return lowrank_delta(x.to(ADAPTER_DTYPE), down, up, mask)

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
        self._state: RankState | None = None
        self._schedule: RankSchedule | None = None

    def keys(self) -> list[str]:
        return [adapter_key(t) for t in self.targets]

    def by_module(self) -> dict[str, list[TrainableAdapter]]:
        groups: dict[str, list[TrainableAdapter]] = {}
        for adapter in self.adapters:
            groups.setdefault(adapter.target.module, []).append(adapter)
        return groups

    def attach(self, diffusion_model: torch.nn.Module, state: RankState,
               schedule: RankSchedule | None) -> None:
        """Register one forward hook per adapted module (idempotent per run: detach first).

        ``state`` gives each step's masks (a ``RankState(strict=True)``: a layer that runs outside
        a step raises); ``schedule``: the run's ``r(t)``, None for the unmasked variants.
        """
        self.detach()
        self._state, self._schedule = state, schedule
        for name, group in self.by_module().items():
            module = diffusion_model.get_submodule(name)
            self._handles.append(module.register_forward_hook(_training_hook(group, state, schedule)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.end_step()
        self._state = self._schedule = None

    def begin_step(self, timesteps: torch.Tensor) -> None:
        """Set the step's rank masks from ``timesteps`` and build every adapter's factors once.

        Call it outside any checkpointed block (the loop does): a checkpoint's recomputation then
        reuses the same factor tensors instead of rebuilding them, and their backward runs once.
        """
        if self._state is None:
            raise RuntimeError("T-LoRA training: begin_step before attach")
        self._state.set(timesteps)
        rank = _plan(self._state, self._schedule, timesteps.device)[1]
        ortho = [a for a in self.adapters if a.ortho]
        if ortho:
            built = OrthoStepFactors.apply(rank, [(a.A_init, a.B_init, a.S_init) for a in ortho],
                                            *[p for a in ortho for p in (a.A, a.B, a.S)])
            for i, adapter in enumerate(ortho):
                adapter.step_factors = (built[2 * i], built[2 * i + 1])
        for adapter in self.adapters:
            if not adapter.ortho:
                adapter.step_factors = adapter.factors(rank)

    def end_step(self) -> None:
        """Clear the step's masks and drop its factors (and the autograd graph they hold)."""
        if self._state is not None:
            self._state.clear()
        for adapter in self.adapters:
            adapter.step_factors = None

    def export(self, schedule: RankSchedule | None) -> dict[str, list[LowRankAdapter]]:
        """``{module: [LowRankAdapter]}`` for :class:`TLoRAWeights`; one shared rank_index tensor
        per column layout, so the Loader computes each mask once per model call."""
        index_by_parts = {p: torch.arange(self.rank).repeat(p) for p in (1, 2)}
        return {name: [a.export(schedule, index_by_parts[a.parts]) for a in group]
                for name, group in self.by_module().items()}


def _plan(state: RankState, schedule: RankSchedule | None,
          device: torch.device) -> tuple[torch.Tensor | None, int | None]:
    """``(mask (B, keep) or None, keep)`` of the step's column plan; (None, None) if unmasked."""
    plan = state.plan(schedule, device)
    return (None, None) if plan is None else (plan.mask, plan.keep)


def _training_hook(group: list[TrainableAdapter], state: RankState, schedule: RankSchedule | None):
    def forward_hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # One float32 copy of the input for all adapters of the layer (a fused qkv has three),
        # which autograd keeps for backward.
        x = args[0].to(ADAPTER_DTYPE)
        mask, rank = _plan(state, schedule, x.device)
        # Without begin_step (masks set directly) each layer builds its factors itself.
        deltas = [(a.target.out_rows, a.delta(x, mask, rank, a.step_factors)) for a in group]
        return _add_rows(output, deltas)

    return forward_hook
