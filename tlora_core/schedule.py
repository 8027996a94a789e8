"""The T-LoRA rank schedule: which ranks are active at diffusion timestep t.

Paper, Eq. (6): ``r(t) = floor((r - r_min) * (T - t) / T) + r_min``. The official code generalises
it with an exponent and that is what produced the paper's numbers, so it is what we compute::

    r(t) = int(((T - t) / T) ** power * (R - r_min)) + r_min      # T = 1000, int() truncates

clamped to ``[r_min, R]``. ``power = 1`` is the paper's linear schedule. At t = T only ``r_min`` ranks
are active; at t = 0 all ``R``. The first ``r(t)`` rank indices are the active ones.
"""

from __future__ import annotations

import math

import torch

DEFAULT_T = 1000
FLOW_TIMESTEP_SCALE = 1000.0
"""Flow models (FLUX, SD3): the reference code feeds its schedule ``t = 1000 * sigma``."""
AUTO_MIN_RANK = -1
"""The nodes' "automatic" min_rank: the file's value where there is a file that stores one, else
:func:`default_min_rank` of the rank."""
AUTO_MIN_RANK_TEXT = "-1 = automatic: the value stored in the file, else half the rank (rounded up)"
"""How the nodes' tooltips say it."""


def default_min_rank(rank: int) -> int:
    """The paper's recommended ``r_min``: half the rank, rounded up, at least 1 (64 -> 32, 7 -> 4).

    The one rule for "half the rank" in the pack: the Train node's default, the readers' default
    for files that store no schedule, the Preview's, and every message that recommends a value.
    """
    return max(1, math.ceil(int(rank) / 2))


def validate_schedule(rank: int, min_rank: int, power: float = 1.0, T: int = DEFAULT_T) -> None:
    """Raise ValueError with a readable message unless ``0 < min_rank <= rank``, power > 0, T > 0."""
    if int(rank) != rank or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    if int(min_rank) != min_rank or not 0 < min_rank <= rank:
        raise ValueError(
            f"min_rank must be an integer in [1, rank={rank}], got {min_rank} "
            f"(the paper recommends half the rank: {default_min_rank(rank)})")
    if not math.isfinite(power) or power <= 0:
        raise ValueError(f"schedule power must be a finite number > 0, got {power}")
    if int(T) != T or T < 1:
        raise ValueError(f"T (number of training timesteps) must be a positive integer, got {T}")


def resolve_min_rank(rank: int, min_rank: float) -> int:
    """``min_rank`` as an absolute rank: a value in (0, 1) is a fraction of ``rank``, rounded up and
    at least 1 (0.5 = :func:`default_min_rank`); a value >= 1 is taken as an integer."""
    if not math.isfinite(min_rank) or min_rank <= 0:
        raise ValueError(f"min_rank must be > 0 (a fraction in (0, 1) or a rank >= 1), got {min_rank}")
    if min_rank < 1:
        resolved = max(1, math.ceil(min_rank * rank))
    else:
        if int(min_rank) != min_rank:
            raise ValueError(f"min_rank >= 1 must be a whole number of ranks, got {min_rank}")
        resolved = int(min_rank)
    validate_schedule(rank, resolved)
    return resolved


def active_rank(t: torch.Tensor | float | int, rank: int, min_rank: int, power: float = 1.0,
                T: int = DEFAULT_T) -> torch.Tensor:
    """Active rank r(t) for each timestep in ``t`` (any shape), as an int64 tensor on t's device.

    Timesteps must lie in [0, T]; non-integer timesteps (flow models: t = 1000 * sigma) are used as
    they are, like the reference code does.
    """
    validate_schedule(rank, min_rank, power, T)
    t = torch.as_tensor(t)
    # Computed on the CPU in float64, as the reference code's Python floats: float32 rounding
    # would move some timesteps across an integer boundary. One small copy per model call.
    t64 = t.detach().to("cpu", torch.float64)
    if bool(((t64 < 0) | (t64 > T) | ~torch.isfinite(t64)).any()):
        raise ValueError(f"timesteps must lie in [0, {T}], got {t64.flatten()[:8].tolist()}")
    frac = ((T - t64) / T) ** power
    r = (frac * (rank - min_rank)).to(torch.int64) + min_rank   # .to(int64) truncates, like int()
    return r.clamp_(min_rank, rank).to(t.device)


def rank_mask(active: torch.Tensor, rank_index: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-sample column mask: ``mask[b, j] = rank_index[j] < active[b]``.

    Args:
        active: (B,) active rank per sample (from :func:`active_rank`).
        rank_index: (k,) schedule rank each adapter column belongs to.
    Returns:
        (B, k) tensor of 0/1 in ``dtype`` on ``rank_index``'s device.
    """
    active = active.to(rank_index.device).reshape(-1, 1)
    return (rank_index.reshape(1, -1) < active).to(dtype)
