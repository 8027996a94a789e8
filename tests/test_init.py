"""Ortho-LoRA and vanilla T-LoRA initialisation: shapes, orthonormality, the exact zero at init, the
official code's layout, and - statistically, over many seeds - that ``fast`` draws the law of ``exact``.

The statistical tests use fixed seeds, so they are deterministic; their thresholds (p > 1e-3) are
loose enough for a correct sampler and a power check shows they reject a one-row-off matrix shape.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from scipy import stats

from tlora_core import init
from tlora_core.adapter import LowRankAdapter, RankSchedule, lowrank_delta
from tlora_core.init import OrthoFactors, gaussian_std, ortho_init, vanilla_init
from tlora_core.schedule import rank_mask

MODES = ("fast", "exact")
SHAPES = [(12, 8, 4), (8, 12, 4), (16, 16, 8), (5, 9, 5), (9, 5, 1), (1, 7, 1)]  # (out, in, rank)
P_MIN = 1e-3   # KS p-value below which two samples are called different
N_DRAWS = 1000  # per (shape, mode): a KS test then sees CDF gaps of ~0.09 at P_MIN


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """The matrices here are tiny: intra-op threads only add scheduling stalls on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def draw(mode: str, out: int, inn: int, r: int, n: int, seed: int, **kw) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    fs = [ortho_init(out, inn, r, mode=mode, generator=g, dtype=torch.float64, **kw) for _ in range(n)]
    return {k: torch.stack([getattr(f, k) for f in fs]) for k in ("A", "B", "S")}


_CACHE: dict[tuple, dict[str, torch.Tensor]] = {}


def samples(mode: str, out: int, inn: int, r: int) -> dict[str, torch.Tensor]:
    """N_DRAWS draws per (mode, shape), shared by the statistical tests; different seeds per mode."""
    key = (mode, out, inn, r)
    if key not in _CACHE:
        _CACHE[key] = draw(mode, out, inn, r, N_DRAWS, seed=10_000 * MODES.index(mode) + 100 * out + inn)
    return _CACHE[key]


def ks_p(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(stats.ks_2samp(x.numpy(), y.numpy()).pvalue)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("out,inn,r", SHAPES)
def test_shapes_and_dtypes(mode, dtype, out, inn, r):
    f = ortho_init(out, inn, r, mode=mode, generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert isinstance(f, OrthoFactors)
    assert f.A.shape == (r, inn) and f.B.shape == (out, r) and f.S.shape == (r,)
    assert {f.A.dtype, f.B.dtype, f.S.dtype} == {dtype}
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in (f.A, f.B, f.S))
    # Each factor owns just its own storage (a view would keep exact's full U / Vh alive per layer).
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in (f.A, f.B, f.S))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("out,inn,r", SHAPES + [(96, 160, 32)])
def test_frames_are_orthonormal(mode, dtype, tol, out, inn, r):
    # exact runs its SVD in float32 (as the official code), so its frames are orthonormal to ~1e-6
    # whatever the output dtype; fast builds them in float64. float32 tolerance: n eps32 for n <= 160.
    tol = max(tol, 2e-5) if mode == "exact" else tol
    f = ortho_init(out, inn, r, mode=mode, generator=torch.Generator().manual_seed(1), dtype=dtype)
    eye = torch.eye(r, dtype=torch.float64)
    torch.testing.assert_close(f.A.double() @ f.A.double().T, eye, rtol=0, atol=tol)
    torch.testing.assert_close(f.B.double().T @ f.B.double(), eye, rtol=0, atol=tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("out,inn,r", SHAPES)
def test_singular_values_positive_and_descending_like_the_reference(mode, out, inn, r):
    S = ortho_init(out, inn, r, mode=mode, generator=torch.Generator().manual_seed(2)).S
    assert bool((S > 0).all())
    assert torch.equal(S, S.sort(descending=True).values)  # s[-r:] of LAPACK's descending order


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out,inn,r", [(24, 16, 8), (16, 40, 6), (10, 10, 1)])
def test_ortho_adapter_is_exactly_zero_at_init_under_every_mask(mode, dtype, out, inn, r):
    f = ortho_init(out, inn, r, mode=mode, generator=torch.Generator().manual_seed(3), dtype=dtype)
    adapter = LowRankAdapter(down=torch.cat([f.A, f.A]), up=torch.cat([f.B * f.S, -f.B * f.S], dim=1),
                             rank_index=torch.arange(r).repeat(2),
                             schedule=RankSchedule(r, max(1, r // 2)), parts=2)
    x = torch.randn(3, 5, inn, generator=torch.Generator().manual_seed(4)).to(dtype)
    zeros = torch.zeros(3, 5, out, dtype=dtype)
    actives = range(adapter.schedule.min_rank, r + 1)
    for active in actives:
        mask = rank_mask(torch.tensor([active]), adapter.rank_index, dtype)
        assert torch.equal(lowrank_delta(x, adapter.down, adapter.up, mask, parts=2), zeros)
    per_sample = rank_mask(torch.tensor([r, adapter.schedule.min_rank, (r + 1) // 2]), adapter.rank_index,
                           dtype)
    assert torch.equal(lowrank_delta(x, adapter.down, adapter.up, per_sample, parts=2), zeros)
    assert torch.equal(lowrank_delta(x, adapter.down, adapter.up, None, parts=2), zeros)


@pytest.mark.parametrize("mode", MODES)
def test_seeded_generator_is_deterministic(mode):
    a, b, c = (ortho_init(20, 12, 4, mode=mode, generator=torch.Generator().manual_seed(s))
               for s in (7, 7, 8))
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in "ABS")
    assert not any(torch.equal(getattr(a, k), getattr(c, k)) for k in "ABS")
    da, _ = vanilla_init(20, 12, 4, generator=torch.Generator().manual_seed(7))
    db, _ = vanilla_init(20, 12, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(da, db)


@pytest.mark.parametrize("convention", ["reference", "paper"])
@pytest.mark.parametrize("out,inn,r", [(12, 8, 4), (8, 12, 4), (10, 10, 3), (40, 24, 8)])
def test_exact_is_the_official_layout_of_the_same_draw(convention, out, inn, r):
    f = ortho_init(out, inn, r, mode="exact", convention=convention,
                   generator=torch.Generator().manual_seed(5))
    # The official code: R (in x out) ~ N(0, std) in float32, full SVD, last rows of U / columns of Vh.
    std = 1 / r if convention == "reference" else 1 / math.sqrt(r)
    R = torch.normal(0.0, std, size=(inn, out), generator=torch.Generator().manual_seed(5))
    U, s, Vh = torch.linalg.svd(R, full_matrices=True)
    assert torch.equal(f.A, U[-r:, :]) and torch.equal(f.B, Vh[:, -r:]) and torch.equal(f.S, s[-r:])
    # The r smallest singular values of R (values-only LAPACK path: agrees to float32 SVD accuracy).
    torch.testing.assert_close(f.S, torch.linalg.svdvals(R)[-r:], rtol=0, atol=1e-6 * float(s[0]))


@pytest.mark.parametrize("mode", MODES)
def test_paper_convention_scales_S_by_sqrt_rank(mode):
    r = 4
    kw = dict(mode=mode, dtype=torch.float64)
    ref = ortho_init(12, 8, r, generator=torch.Generator().manual_seed(6), **kw)
    paper = ortho_init(12, 8, r, convention="paper", generator=torch.Generator().manual_seed(6), **kw)
    # Same draw, entries scaled by sqrt(r): exact's float32 SVD rescales to ~1e-6 relative.
    tol = 1e-12 if mode == "fast" else 1e-5
    torch.testing.assert_close(paper.S, math.sqrt(r) * ref.S, rtol=tol, atol=0)
    if mode == "fast":  # the frames do not depend on the scale at all
        assert torch.equal(paper.A, ref.A) and torch.equal(paper.B, ref.B)
    assert gaussian_std(64) == 1 / 64 and gaussian_std(64, "paper") == 1 / 8


@pytest.mark.parametrize("out,inn,r", [(12, 8, 4), (8, 12, 4), (8, 8, 4), (48, 40, 2)])
def test_fast_and_exact_draw_the_same_singular_values(out, inn, r):
    # min(out, in) <= 16 r takes all Gram eigenvalues by QL; 48 x 40 at rank 2 takes bisection.
    fast, exact = samples("fast", out, inn, r), samples("exact", out, inn, r)
    for j in range(r):  # the law of each of the r smallest singular values
        assert ks_p(fast["S"][:, j], exact["S"][:, j]) > P_MIN, j


def test_the_singular_value_test_rejects_a_one_row_larger_matrix():
    # Power check: S of a 13 x 8 Gaussian must not pass for that of a 12 x 8 one.
    other = draw("exact", 13, 8, 4, N_DRAWS, seed=99)["S"]
    fast = samples("fast", 12, 8, 4)["S"]
    assert max(ks_p(fast[:, j], other[:, j]) for j in range(4)) < 1e-6


def coordinate_angles(frame_rows: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Cosines of the principal angles between the row space of each (r, n) frame and span(e_0..e_k-1)."""
    return torch.linalg.svdvals(frame_rows[:, :, :k])


@pytest.mark.parametrize("out,inn,r,factor", [(12, 8, 4, "A"), (8, 8, 4, "A"), (8, 12, 4, "B"),
                                              (8, 8, 4, "B")])
def test_fast_and_exact_draw_the_same_frames(out, inn, r, factor):
    # The reference frame is a singular-vector frame with LAPACK's signs, so it is compared through
    # statistics blind to coordinate signs: |entries| and angles to coordinate subspaces. A is such
    # a frame when in <= out, B when out <= in (otherwise it holds LAPACK's basis completion).
    rows = {m: samples(m, out, inn, r)[factor] for m in MODES}
    if factor == "B":
        rows = {m: t.transpose(1, 2) for m, t in rows.items()}
    assert ks_p(rows["fast"][:, 0, 0].abs(), rows["exact"][:, 0, 0].abs()) > P_MIN
    assert ks_p(rows["fast"][:, -1, -1].abs(), rows["exact"][:, -1, -1].abs()) > P_MIN
    cos_fast, cos_exact = coordinate_angles(rows["fast"]), coordinate_angles(rows["exact"])
    for k in range(cos_fast.shape[1]):
        assert ks_p(cos_fast[:, k], cos_exact[:, k]) > P_MIN, k


@pytest.mark.parametrize("out,inn,r", [(12, 8, 4), (8, 12, 4)])
def test_fast_frames_are_rotation_invariant_for_every_shape(out, inn, r):
    # For a uniformly random unit vector in R^n a squared coordinate is Beta(1/2, (n-1)/2): checked
    # on both frames, including the one that exact takes from LAPACK's basis completion.
    s = samples("fast", out, inn, r)
    for entries, n in ((s["A"][:, 0, 0], inn), (s["A"][:, -1, -1], inn), (s["B"][:, 0, 0], out),
                       (s["B"][:, -1, -1], out)):
        assert stats.kstest((entries**2).numpy(), stats.beta(0.5, (n - 1) / 2).cdf).pvalue > P_MIN


def test_exact_completion_factor_leans_to_the_last_coordinates():
    # Characterises the official layout that the module docstring describes: when in > out, rows of
    # U past the first `out` columns are LAPACK's basis completion, and U[-r:] puts far more than a
    # rotation-invariant frame's share r / in of its energy on the last r input coordinates.
    r, out, inn = 4, 16, 64
    share = {m: float(draw(m, out, inn, r, 30, seed=13)["A"][:, :, -r:].pow(2).sum(dim=(1, 2)).mean()) / r
             for m in MODES}
    assert share["exact"] > 0.4  # measured ~0.6 with this torch's LAPACK
    assert abs(share["fast"] - r / inn) < 0.03  # 30 draws: standard error of the mean ~0.006


@pytest.mark.parametrize("dof", [1, 2, 7, 300])
def test_chi_variates_follow_the_chi_law(dof):
    x = init.chi_variates(torch.full((4000,), float(dof)), generator=torch.Generator().manual_seed(dof))
    assert stats.kstest(x.numpy(), stats.chi(dof).cdf).pvalue > P_MIN


@pytest.mark.parametrize("m,n,r", [(300, 150, 16), (500, 400, 8)])  # QL (all values), bisection
def test_scipy_and_fallback_solvers_agree(monkeypatch, m, n, r):
    g = torch.Generator().manual_seed(11)
    chi = init.chi_variates(torch.cat([m - torch.arange(n), n - 1 - torch.arange(n - 1)]).double(),
                            generator=g)
    d, e = chi[:n].clone(), chi[n:]
    d[-1] *= 1e-6  # one tiny singular value, where squaring into the Gram matrix costs the most
    with_scipy = init._bidiagonal_smallest_singular_values(d, e, r)
    monkeypatch.setattr(init, "_scipy_tridiagonal_solver", lambda: None)
    dense = init._bidiagonal_smallest_singular_values(d, e, r)
    assert torch.equal(with_scipy, with_scipy.sort(descending=True).values)
    # Documented accuracy: 1e-7 relative, or eps32 * ||B|| absolute next to zero (the float32 SVD's);
    # the dense fallback is accurate to float64 (it never squares).
    norm = float(torch.linalg.matrix_norm(torch.diag(d) + torch.diag(e, 1), ord=2))
    assert float((with_scipy - dense).abs().max()) < torch.finfo(torch.float32).eps * norm
    torch.testing.assert_close(with_scipy[:-1], dense[:-1], rtol=1e-7, atol=0)


def test_vanilla_init_matches_the_official_code():
    r, inn, out = 4, 4096, 24
    down, up = vanilla_init(out, inn, r, generator=torch.Generator().manual_seed(12))
    assert down.shape == (r, inn) and up.shape == (out, r) and not up.any()
    assert torch.equal(down, torch.normal(0.0, 1 / r, size=(r, inn),
                                          generator=torch.Generator().manual_seed(12)))
    # std 1/r: the sample std of 16384 N(0, 1/16) values is within 3% (6 standard errors).
    assert abs(float(down.std()) * r - 1) < 0.03
    x = torch.randn(2, inn)
    assert torch.equal(lowrank_delta(x, down, up), torch.zeros(2, out))
    d64, u64 = vanilla_init(out, inn, r, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    assert d64.dtype == u64.dtype == torch.float64 and torch.equal(d64, down.double())


@pytest.mark.parametrize("args,kw,match", [
    ((8, 8, 0), {}, "rank must be >= 1"),
    ((8, 6, 7), {}, r"rank 7 is larger than min\(out_features, in_features\) = 6"),
    ((0, 6, 1), {}, "out_features must be >= 1"),
    ((8, 8, 2.5), {}, "rank must be an integer"),
    ((8, 8, 2), {"mode": "svd"}, "mode must be one of"),
    ((8, 8, 2), {"convention": "variance"}, "convention must be one of"),
    ((8, 8, 2), {"generator": types.SimpleNamespace(device=torch.device("cuda"))}, "CPU torch.Generator"),
])
def test_bad_arguments_are_refused_clearly(args, kw, match):
    with pytest.raises(ValueError, match=match):
        ortho_init(*args, **kw)


def test_vanilla_init_validates_too():
    with pytest.raises(ValueError, match="rank 9 is larger"):
        vanilla_init(8, 16, 9)
