"""Applying fixed adapters (the Loader's) in the forward pass with a per-sample rank mask.

``attach`` registers forward hooks that add ``strength * delta(x, M_t)`` to each target module's
output; ``detach`` removes them, which restores the modules exactly. The masks come from a
:class:`~tlora_core.masks.RankState` (the mechanism the trainer uses too): for an adapter whose
columns hold ranks 0, 1, ... in order within each part, its :class:`~tlora_core.masks.ColumnPlan`
(the first ``keep`` columns of each part, and a per-sample mask over them only when the samples'
ranks differ); for any other column layout, a mask over every column. Masked columns' work is
skipped, and the result is the same sum (zero columns contribute exactly zero). A float32 layer
output is updated in place (it is fresh from the layer) unless autograd records the call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .adapter import LowRankAdapter, add_delta, lowrank_delta
from .masks import ColumnPlan, RankState


def _prefix_columns(adapter: LowRankAdapter) -> int | None:
    """Columns per part if each part's rank_index is 0, 1, 2, ... (so the active columns of rank r
    are the first r of every part), else None."""
    if adapter.schedule is None:
        return None
    per_part = adapter.columns // adapter.parts
    expected = torch.arange(per_part).repeat(adapter.parts)
    return per_part if torch.equal(adapter.rank_index.cpu(), expected) else None


def _planned_delta(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, parts: int, per_part: int,
                   plan: ColumnPlan | None) -> torch.Tensor:
    """``lowrank_delta`` under a column plan: only the first ``plan.keep`` columns of each part
    are computed (views, no copies), times the plan's per-sample mask if it has one."""
    if plan is None or (plan.keep >= per_part and plan.mask is None):
        return lowrank_delta(x, down, up, None, parts)
    keep = min(plan.keep, per_part)
    out = None
    for p in range(parts):
        cols = slice(p * per_part, p * per_part + keep)
        term = lowrank_delta(x, down[cols], up[:, cols], plan.mask)
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
            if columns is not None:
                plan = state.plan(adapter.schedule, x.device)
                delta = _planned_delta(x, down, up, adapter.parts, columns, plan)
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
