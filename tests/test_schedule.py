"""The rank schedule r(t) against the reference formula, its validation and the per-sample mask."""

from __future__ import annotations

import pytest
import torch

from tlora_core.schedule import active_rank, rank_mask, resolve_min_rank, validate_schedule


def reference_rank(t: float, rank: int, min_rank: int, power: float = 1.0, T: int = 1000) -> int:
    # The official code's expression, evaluated with Python floats.
    return int(((T - t) / T) ** power * (rank - min_rank)) + min_rank


EDGES = [0, 1, 500, 999, 1000]
CASES = [(64, 32, 1.0), (64, 16, 1.0), (32, 1, 1.0), (4, 2, 1.0), (64, 32, 2.0), (64, 32, 0.5),
         (7, 3, 1.7), (128, 64, 1.0), (1, 1, 1.0)]


@pytest.mark.parametrize("rank,min_rank,power", CASES)
@pytest.mark.parametrize("t", EDGES)
def test_active_rank_matches_reference_formula_at_the_edges(t, rank, min_rank, power):
    got = active_rank(torch.tensor([t]), rank, min_rank, power)
    assert got.dtype == torch.int64
    assert got.item() == reference_rank(t, rank, min_rank, power)


def test_table_of_known_values():
    # Hand-computed from r(t) = int(((1000 - t) / 1000) ** p * (R - r_min)) + r_min.
    table = {(0, 64, 32, 1.0): 64, (1, 64, 32, 1.0): 63, (500, 64, 32, 1.0): 48,
             (999, 64, 32, 1.0): 32, (1000, 64, 32, 1.0): 32, (500, 64, 32, 2.0): 40,
             (250, 32, 1, 1.0): 24, (750, 64, 0 + 16, 1.0): 28}
    for (t, rank, min_rank, power), expected in table.items():
        assert active_rank(t, rank, min_rank, power).item() == expected, (t, rank, min_rank, power)


def test_vectorised_over_a_batch_and_every_integer_timestep():
    t = torch.arange(0, 1001)
    got = active_rank(t, 64, 32)
    assert got.shape == t.shape
    assert got.tolist() == [reference_rank(float(v), 64, 32) for v in range(1001)]
    assert bool((got[:-1] >= got[1:]).all()), "r(t) must not increase with t"


def test_fractional_flow_timesteps_use_the_same_formula():
    sigmas = torch.tensor([1.0, 0.8765, 0.5, 0.1234, 0.0])
    got = active_rank(1000 * sigmas.double(), 32, 1)
    assert got.tolist() == [reference_rank(1000 * float(s), 32, 1) for s in sigmas.double()]


def test_result_stays_on_the_input_device_and_shape():
    t = torch.tensor([[0.0, 999.0]])
    assert active_rank(t, 8, 4).shape == (1, 2)


@pytest.mark.parametrize("rank,min_rank,power,T,match", [
    (0, 1, 1.0, 1000, "rank must be a positive integer"),
    (8, 0, 1.0, 1000, "min_rank must be an integer in"),
    (8, 9, 1.0, 1000, "min_rank must be an integer in"),
    (8, 4, 0.0, 1000, "power must be a finite number > 0"),
    (8, 4, float("nan"), 1000, "power"),
    (8, 4, 1.0, 0, "T "),
])
def test_validation_messages(rank, min_rank, power, T, match):
    with pytest.raises(ValueError, match=match):
        validate_schedule(rank, min_rank, power, T)


@pytest.mark.parametrize("bad", [-1.0, 1000.5, float("nan")])
def test_timesteps_outside_range_are_refused(bad):
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\]"):
        active_rank(torch.tensor([10.0, bad]), 8, 4)


@pytest.mark.parametrize("rank,value,expected", [(64, 0.5, 32), (64, 0.25, 16), (7, 0.5, 4),
                                                 (1, 0.5, 1), (64, 32, 32), (64, 1, 1)])
def test_resolve_min_rank(rank, value, expected):
    assert resolve_min_rank(rank, value) == expected


@pytest.mark.parametrize("value", [0, -0.5, 65, 2.5])
def test_resolve_min_rank_refuses(value):
    with pytest.raises(ValueError):
        resolve_min_rank(64, value)


def test_rank_mask_per_sample():
    active = torch.tensor([1, 3, 4])
    rank_index = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mask = rank_mask(active, rank_index)
    assert mask.shape == (3, 8)
    assert mask[0].tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
    assert mask[1].tolist() == [1, 1, 1, 0, 1, 1, 1, 0]
    assert mask[2].tolist() == [1.0] * 8
