"""Initialisation of the adapter factors: Ortho-LoRA (paper Sec. 3.3-3.4) and Vanilla T-LoRA (Sec. 3.2).

Ortho-LoRA starts from the LAST r singular triplets of a random Gaussian matrix R: orthonormal
frames ``A_init`` (r, in) and ``B_init`` (out, r) and the r smallest singular values ``S_init`` (r,).
The trainable A, B, S start equal to these frozen copies, so ``W - B_init S_init M_t A_init + B S M_t A``
equals W at initialisation under every mask M_t.

What the official code does (ControlGenAI/T-LoRA, ``OrthogonalLoRALinearLayer``, ``sig_type="last"``),
and what ``mode="exact", convention="reference"`` reproduces for the same draw of R:

- R has shape (in, out) and entries N(0, std = 1/r), drawn in float32 on the CPU;
- full SVD ``R = U diag(s) Vh`` with full matrices (U is in x in, Vh is out x out);
- ``A_init = U[-r:, :]`` (the last r ROWS of U), ``B_init = Vh[:, -r:]`` (the last r COLUMNS of Vh),
  ``S_init = s[-r:]`` (the r smallest singular values in LAPACK's descending order, so ``S[0]`` is the
  largest of them). The official code keeps S as a (1, r) parameter; here it is (r,).

These rows and columns are orthonormal frames, not the paired singular vectors that the paper's
``A_init = V^T[-r:], B_init = U[-r:]`` suggests; only orthonormality and S matter to the method.
The paper writes R ~ N(0, 1/r), a VARIANCE of 1/r (std 1/sqrt(r)); the code uses std 1/r.
``convention="paper"`` uses the paper's variance: S is sqrt(r) times larger, the frames are unchanged.
The paper's figures were produced by the code, hence the default ``convention="reference"``.

``mode="fast"`` draws the same law without any full SVD. S_init are the r smallest singular values of
an in x out Gaussian, sampled exactly from the Dumitriu-Edelman bidiagonal model (2 min(in, out) - 1
chi variates, then the r smallest eigenvalues of a tridiagonal matrix); the frames are independent
Haar (rotation-invariant) frames, each from the QR of a Gaussian with the signs fixed.

Where the two modes have the same law, and where not (checked statistically in the tests):

- S_init: identical in law for every shape.
- A_init when in <= out, B_init when out <= in (so both on every square layer, i.e. all but SDXL's
  cross-attention to_k / to_v): all of U's columns (Vh's rows) are singular vectors of a Gaussian
  matrix, so the reference frame is a Haar frame up to LAPACK's choice of signs, which flips the signs
  of some input (output) coordinates. The laws agree for every statistic blind to those signs
  (|entries|, angles to coordinate subspaces, ...); on square layers (A, B, S) are independent in
  both modes.
- A_init when in > out (B_init when out > in): U's columns past the first ``out`` are LAPACK's
  completion of the basis, not singular vectors, and ``U[-r:]`` leans toward the last input
  coordinates: at rank 64, about half of A_init's energy sits in the last 64 of the 2048 context
  channels for SDXL's 2048 -> 640 to_k / to_v and a sixth for 2048 -> 1280, against r / in = 3% for
  a rotation-invariant frame. ``fast`` keeps the rotation-invariant law (the paper's intent); use
  ``exact`` to reproduce the official code's layout.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MODES = ("fast", "exact")
CONVENTIONS = ("reference", "paper")
_PROPOSALS = 4  # gamma rejection-sampler candidates drawn per value and round
_RELATIVE_ACCURACY = 1e-7  # of the fast init's singular values (float32 resolution: 6e-8)
_ALL_EIGENVALUES_UP_TO = 12  # n / r below which computing all n Gram eigenvalues beats bisection


@dataclass
class OrthoFactors:
    """The frozen Ortho-LoRA init; the trainable A, B, S start as copies of these."""

    A: torch.Tensor  # (r, in), orthonormal rows (the reference's q_layer / base_q)
    B: torch.Tensor  # (out, r), orthonormal columns (p_layer / base_p)
    S: torch.Tensor  # (r,), positive, descending (lambda_layer / base_lambda, there (1, r))


def gaussian_std(rank: int, convention: str = "reference") -> float:
    """Standard deviation of R's entries: 1/r for the official code, 1/sqrt(r) (variance 1/r) for the paper."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    return 1.0 / rank if convention == "reference" else 1.0 / math.sqrt(rank)


def ortho_init(out_features: int, in_features: int, rank: int, *, mode: str = "fast",
               convention: str = "reference", generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> OrthoFactors:
    """Ortho-LoRA init of one Linear (out_features x in_features) at ``rank``; see the module docstring.

    Args:
        mode: "exact" (full SVD, the official code's layout) or "fast" (same law, no full SVD).
        convention: "reference" (std 1/r, the official code) or "paper" (variance 1/r).
        generator: a CPU generator for reproducible draws (None: torch's global generator). The
            factors are always computed on the CPU, so a seed gives the same init on any device.
    Returns:
        ``OrthoFactors`` in ``dtype`` on ``device``.
    """
    out_features, in_features, rank = _check_shape(out_features, in_features, rank)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    std = gaussian_std(rank, convention)
    _check_generator(generator)
    if mode == "exact":
        A, B, S = _exact(out_features, in_features, rank, std, generator)
    else:
        A, B, S = _fast(out_features, in_features, rank, std, generator)
    return OrthoFactors(*(t.to(device=device, dtype=dtype).contiguous() for t in (A, B, S)))


def vanilla_init(out_features: int, in_features: int, rank: int, *,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Vanilla T-LoRA init as the official code: ``down`` (r, in) ~ N(0, std 1/r), ``up`` (out, r) = 0.

    ``up = 0`` makes the adapter's output exactly zero at initialisation.
    """
    out_features, in_features, rank = _check_shape(out_features, in_features, rank)
    _check_generator(generator)
    down = torch.normal(0.0, 1.0 / rank, size=(rank, in_features), generator=generator,
                        dtype=torch.float32)
    up = torch.zeros(out_features, rank, dtype=dtype, device=device)
    return down.to(device=device, dtype=dtype), up


def _check_shape(out_features: int, in_features: int, rank: int) -> tuple[int, int, int]:
    values = {"out_features": out_features, "in_features": in_features, "rank": rank}
    for name, value in values.items():
        try:
            value = operator.index(value)
        except TypeError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        values[name] = value
    out_features, in_features, rank = values.values()
    if rank > min(out_features, in_features):
        raise ValueError(
            f"rank {rank} is larger than min(out_features, in_features) = "
            f"{min(out_features, in_features)} for a {out_features} x {in_features} layer: a rank-r "
            f"adapter needs r orthonormal directions on both sides")
    return out_features, in_features, rank


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"the init is drawn on the CPU; pass a CPU torch.Generator, got one on "
                         f"{generator.device}")


def _exact(out_features: int, in_features: int, rank: int, std: float,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official computation: float32 R (in x out), full SVD, last r rows of U / columns of Vh."""
    R = torch.normal(0.0, std, size=(in_features, out_features), generator=generator,
                     dtype=torch.float32)
    U, s, Vh = torch.linalg.svd(R, full_matrices=True)
    # Copies, so the returned factors do not keep the full U and Vh alive.
    return U[-rank:, :].clone(), Vh[:, -rank:].clone(), s[-rank:].clone()


def _fast(out_features: int, in_features: int, rank: int, std: float,
          generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same law as ``_exact`` (see the module docstring), in float64, with no full SVD."""
    m, n = max(out_features, in_features), min(out_features, in_features)
    S = std * smallest_gaussian_singular_values(m, n, rank, generator=generator)
    A = haar_frame(in_features, rank, generator=generator).T
    B = haar_frame(out_features, rank, generator=generator)
    return A, B, S


def haar_frame(n: int, r: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, r) float64 frame with orthonormal columns, uniformly (Haar) distributed.

    Q of the QR of an n x r Gaussian, each column's sign chosen so that the triangular factor has a
    positive diagonal: without that fix Q inherits LAPACK's sign convention and is not Haar
    (Mezzadri 2007).
    The Gaussian is drawn in float32 (like the official R; torch draws it ~5x faster than float64)
    and factorised in float64.
    """
    gaussian = torch.randn(n, r, generator=generator, dtype=torch.float32).double()
    q, r_factor = torch.linalg.qr(gaussian)
    return q * torch.where(torch.diagonal(r_factor) < 0, -1.0, 1.0)


def smallest_gaussian_singular_values(m: int, n: int, r: int, *,
                                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The r smallest singular values of an m x n (m >= n) matrix of N(0, 1) entries, descending, float64.

    Dumitriu & Edelman (2002): Householder bidiagonalisation of such a matrix leaves an n x n upper
    bidiagonal matrix with independent diagonal chi_m, chi_{m-1}, ..., chi_{m-n+1} and superdiagonal
    chi_{n-1}, ..., chi_1, with the same singular values. They are the square roots of the
    eigenvalues of its tridiagonal Gram matrix, of which the r smallest are found in O(n r) by
    bisection or, when n <= 12 r, all in O(n^2) by QL (scipy's LAPACK dstebz / dsterf; without
    scipy, a dense O(n^3) svdvals of the bidiagonal).
    Each value is within 1e-7 relative, or eps32 ||R|| absolute for values near zero (the accuracy of
    exact's float32 SVD).
    """
    if not 1 <= r <= n <= m:
        raise ValueError(f"need 1 <= r <= n <= m, got m={m}, n={n}, r={r}")
    dof = torch.cat([m - torch.arange(n, dtype=torch.float64),
                     n - 1 - torch.arange(n - 1, dtype=torch.float64)])
    chi = chi_variates(dof, generator=generator)
    return _bidiagonal_smallest_singular_values(chi[:n], chi[n:], r)


def chi_variates(dof: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Chi-distributed samples (float64) with degrees of freedom ``dof`` (any positive reals)."""
    return (2.0 * standard_gamma(dof.to(torch.float64) / 2.0, generator=generator)).sqrt()


def standard_gamma(shape: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gamma(shape, 1) samples (float64) by Marsaglia & Tsang's (2000) exact rejection method.

    Shapes below 1 use Gamma(a) = Gamma(a + 1) * U^(1/a). Every draw comes from ``generator``, so a
    seed fixes the result (torch's own gamma sampler takes no generator).
    """
    shape = shape.to(torch.float64).reshape(-1)
    if not bool((shape > 0).all()):
        raise ValueError("gamma shapes must be > 0")
    boost = shape < 1
    alpha = torch.where(boost, shape + 1.0, shape)
    d = alpha - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(alpha)
    todo = torch.arange(alpha.numel())
    while todo.numel():
        # _PROPOSALS candidates per value at once: each is accepted with probability >= 0.95, so
        # one round almost always finishes; the first accepted candidate is the sample.
        x = torch.randn(todo.numel(), _PROPOSALS, generator=generator, dtype=torch.float64)
        u = 1.0 - torch.rand(todo.numel(), _PROPOSALS, generator=generator, dtype=torch.float64)
        dk = d[todo, None]
        v = (1.0 + c[todo, None] * x) ** 3
        log_v = torch.log(v.clamp_min(torch.finfo(torch.float64).tiny))
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + dk - dk * v + dk * log_v)
        hit = ok.any(dim=1)
        first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)
        out[todo[hit]] = (dk * v).gather(1, first).squeeze(1)[hit]
        todo = todo[~hit]
    if bool(boost.any()):
        u = 1.0 - torch.rand(int(boost.sum()), generator=generator, dtype=torch.float64)
        out[boost] *= u ** (1.0 / shape[boost])
    return out


def _bidiagonal_smallest_singular_values(d: torch.Tensor, e: torch.Tensor, r: int) -> torch.Tensor:
    """The r smallest singular values (descending) of the upper bidiagonal matrix (diag d, superdiag e)."""
    solver = _scipy_tridiagonal_solver()
    if solver is None:
        bidiagonal = torch.diag(d) + torch.diag(e, 1)
        return torch.linalg.svdvals(bidiagonal)[-r:]
    gram_diag = d * d
    gram_diag[1:] += e * e
    gram_off = d[:-1] * e
    if d.numel() <= _ALL_EIGENVALUES_UP_TO * r:  # then all n by root-free QL (dsterf, O(n^2)) is cheaper
        eigvals = torch.from_numpy(solver(gram_diag.numpy(), gram_off.numpy(), lapack_driver="sterf"))
    else:
        eigvals = _bisect_smallest(solver, gram_diag, gram_off, r)
    eigvals = eigvals.to(torch.float64).sort().values[:r]
    return eigvals.clamp_min(0.0).sqrt().flip(0)


def _bisect_smallest(solver: Callable, diag: torch.Tensor, off: torch.Tensor, r: int) -> torch.Tensor:
    """The r smallest eigenvalues of the Gram matrix by LAPACK bisection (dstebz, O(n r)).

    An absolute tolerance tol on lambda moves s = sqrt(lambda) by at most min(sqrt(tol), tol / (2 s)).
    The r // 8 smallest get tol = (eps32 s_max)^2: error below eps32 s_max even next to s = 0 (the
    accuracy of exact's float32 SVD) and ~1e-7 relative for ordinary values. The others, all at least
    the largest of those (lambda_k), get tol = 2e-7 lambda_k: at most 1e-7 relative, for a third
    fewer bisection steps than one tolerance for all.
    """
    zero = off.new_zeros(1)
    s_max2 = float((diag + torch.cat([off, zero]) + torch.cat([zero, off])).max())  # Gershgorin
    eps = torch.finfo(torch.float32).eps
    tight = eps**2 * s_max2
    k = max(1, r // 8)

    def bisect(first: int, last: int, tol: float) -> torch.Tensor:
        values = solver(diag.numpy(), off.numpy(), select="i", select_range=(first, last),
                        lapack_driver="stebz", tol=tol)
        return torch.from_numpy(values)

    small = bisect(0, k - 1, tight)
    if k == r:
        return small
    loose = 2.0 * _RELATIVE_ACCURACY * float(small.max())
    return torch.cat([small, bisect(k, r - 1, max(tight, loose))])


@functools.cache
def _scipy_tridiagonal_solver() -> Callable | None:
    """scipy's LAPACK tridiagonal eigensolvers when scipy is installed (it ships with ComfyUI), else None."""
    try:
        from scipy.linalg import eigvalsh_tridiagonal
    except ImportError:
        log.info("scipy not found: the fast Ortho init uses a dense svdvals (same law, slower)")
        return None
    return eigvalsh_tridiagonal
