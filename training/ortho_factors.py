"""The Ortho-LoRA factors of one training step, and their hand-written backward.

Per adapter, with ``U = B S`` and ``U0 = B0 S0`` (see :mod:`training.modules`)::

    down = [A; A - A0],   up = [U - U0 | U0]

on the first ``rank`` columns (the step's largest active rank). These depend on the parameters
only, so :class:`OrthoStepFactors` builds them once per step for every Ortho adapter as one
autograd node: the same values as the per-adapter graph, a dozen small autograd ops fewer per
adapter and step.
"""

from __future__ import annotations

import torch


def ortho_factors(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, a0: torch.Tensor,
                   b0: torch.Tensor, s0: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``([A; A - A0], [B S - B0 S0 | B0 S0])`` on the first ``rank`` columns (module docstring)."""
    if rank is not None and rank < a.shape[0]:
        a, b, s, a0, b0, s0 = a[:rank], b[:, :rank], s[:rank], a0[:rank], b0[:, :rank], s0[:rank]
    u0 = b0 * s0   # the same product as the trained b * s: U - U0 is exactly zero at init
    return torch.cat([a, a - a0]), torch.cat([b * s - u0, u0], dim=1)


class OrthoStepFactors(torch.autograd.Function):
    """Every Ortho adapter's ``ortho_factors`` of one step as ONE autograd node.

    Same values as the per-adapter autograd graph (the forward runs the same function); the
    backward is written out: ``down = [A; A - A0]`` gives ``dA = g[:r] + g[r:]``, ``up[:, :r] = B S -
    U0`` gives ``dB = g_U S`` and ``dS = sum_rows(g_U B)``; columns beyond ``r`` get zeros. This
    replaces a dozen small autograd ops per adapter and step, the bulk of the Ortho variants' cost
    over a plain LoRA on small layers.

    ``apply(rank, frozen, *params)``: ``frozen`` = [(A0, B0, S0)] and ``params`` = A, B, S per adapter,
    in the same order; returns down, up per adapter.
    """

    @staticmethod
    def forward(ctx, rank, frozen, *params):
        ctx.set_materialize_grads(False)
        ctx.rank = rank
        ctx.save_for_backward(*params)
        out = []
        for i, (a0, b0, s0) in enumerate(frozen):
            out += ortho_factors(*params[3 * i:3 * i + 3], a0, b0, s0, rank)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        params = ctx.saved_tensors
        out: list[torch.Tensor | None] = [None, None]
        for i in range(len(params) // 3):
            a, b, s = params[3 * i:3 * i + 3]
            g_down, g_up = grads[2 * i], grads[2 * i + 1]
            r = a.shape[0] if ctx.rank is None else min(ctx.rank, a.shape[0])
            g_a = g_b = g_s = None
            if g_down is not None:
                g_a = _padded(g_down[:r] + g_down[r:], a, 0)
            if g_up is not None:
                g_u = g_up[:, :r]
                g_b = _padded(g_u * s[:r], b, 1)
                g_s = _padded((g_u * b[:, :r]).sum(0), s, 0)
            out += [g_a, g_b, g_s]
        return tuple(out)


def _padded(grad: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """``grad`` of the first columns of ``like`` along ``dim``, zero-padded to ``like``'s shape."""
    if grad.shape == like.shape:
        return grad
    full = torch.zeros_like(like)
    full.narrow(dim, 0, grad.shape[dim]).copy_(grad)
    return full
