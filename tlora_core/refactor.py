"""Re-factoring a low-rank product into orthonormal components sorted by singular value.

Given ``delta = up @ down`` (up (n, r), down (r, m)), a thin QR of each factor and an SVD of the
small r x r core give the exact SVD of delta without forming it::

    up = Q_u R_u,  down^T = Q_d R_d,  R_u R_d^T = U diag(s) V^T
    delta = (Q_u U diag(s)) (V^T Q_d^T)  =  up' @ down'

``down'`` has orthonormal rows, ``up'`` orthogonal columns of norms ``s`` (descending). Masking the
last columns then drops the weakest components first, so any LoRA can be given the T-LoRA rank
schedule (paper Eq. 5 with ``B = up'``, ``A = down'``): at t = 0 every column is active and the
delta is the original one; at t = T only the ``min_rank`` strongest components remain.
Cost: O((n + m) r^2) per layer, never an n x m matrix.
"""

from __future__ import annotations

import torch


def refactor_lowrank(down: torch.Tensor, up: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal components of ``up @ down``, strongest first.

    Args:
        down: (r, m). up: (n, r); any scale (alpha / rank) already folded in.
        dtype: dtype of the returned factors. The factorisation itself runs in float64 so that
            the re-factored product matches the original to float32 rounding.
    Returns:
        ``(down', up', s)`` with down' (k, m) orthonormal rows, up' (n, k) = components times
        their singular values, s (k,) descending; k = min(r, n, m) and ``up' @ down' == up @ down``.
    """
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"need down (r, m) and up (n, r); got down {tuple(down.shape)}, "
                         f"up {tuple(up.shape)}")
    q_up, r_up = torch.linalg.qr(up.detach().to(torch.float64))
    q_down, r_down = torch.linalg.qr(down.detach().to(torch.float64).T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    up_new = (q_up @ u) * s
    down_new = vh @ q_down.T
    return down_new.to(dtype), up_new.to(dtype), s.to(dtype)
