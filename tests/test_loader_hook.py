"""The Loader's hook fast path (pure torch): when every sample of a call has the same active rank,
the adapter factors are sliced to the active columns instead of masked.

Tolerance: the sliced and the masked products sum the same non-zero terms (masked columns add
exact zeros), but a GEMM may block a shorter reduction differently, so they agree to float32
rounding of sums of <= 2 * 16 products of O(1) values: 1e-5 absolute.
"""

from __future__ import annotations

import pytest
import torch

from tlora_core.adapter import LowRankAdapter, RankSchedule, lowrank_delta
from tlora_core.apply import attach, detach
from tlora_core.masks import RankState
from tlora_core.schedule import active_rank, rank_mask

ATOL = 1e-5


def ortho(n: int, m: int, r: int, min_rank: int, at_init: bool = False, seed: int = 0) -> LowRankAdapter:
    g = torch.Generator().manual_seed(seed)
    a0, b0, s0 = torch.randn(r, m, generator=g), torch.randn(n, r, generator=g), torch.rand(r, generator=g)
    a, b, s = (a0, b0, s0) if at_init else (a0 + 0.1 * torch.randn(r, m, generator=g), b0 * 1.1, s0 + 0.2)
    return LowRankAdapter(torch.cat([a, a0]), torch.cat([b * s, -b0 * s0], dim=1),
                          torch.arange(r).repeat(2), RankSchedule(r, min_rank), parts=2)


def masked_reference(layer, adapter, x, t) -> torch.Tensor:
    active = active_rank(t, adapter.schedule.rank, adapter.schedule.min_rank)
    mask = rank_mask(active, adapter.rank_index)
    return layer(x) + lowrank_delta(x, adapter.down, adapter.up, mask, adapter.parts)


@pytest.mark.parametrize("t", [0.0, 250.0, 999.0, 1000.0])
@pytest.mark.parametrize("variant", ["ortho", "vanilla"])
def test_uniform_batch_slices_and_equals_the_masked_product(t, variant):
    torch.manual_seed(1)
    layer = torch.nn.Linear(24, 16)
    adapter = ortho(16, 24, 8, 2) if variant == "ortho" else LowRankAdapter(
        torch.randn(8, 24), torch.randn(16, 8), torch.arange(8), RankSchedule(8, 2))
    state = RankState()
    handles = attach({"l": layer}, {"l": [adapter]}, state)
    x = torch.randn(2, 5, 24)
    ts = torch.tensor([t, t])
    with state.at(ts):
        got = layer(x)
        assert state.uniform_rank(adapter.schedule) == int(active_rank(t, 8, 2))
        assert not state._masks   # no mask built: the sliced path ran
    detach(handles)
    torch.testing.assert_close(got, masked_reference(layer, adapter, x, ts), rtol=0, atol=ATOL)


def test_mixed_batch_uses_per_sample_masks():
    layer = torch.nn.Linear(12, 10)
    adapter = ortho(10, 12, 6, 2)
    state = RankState()
    handles = attach({"l": layer}, {"l": [adapter]}, state)
    x, ts = torch.randn(3, 4, 12), torch.tensor([999.0, 500.0, 0.0])
    with state.at(ts):
        got = layer(x)
        assert state.uniform_rank(adapter.schedule) is None and len(state._masks) == 1
    detach(handles)
    torch.testing.assert_close(got, masked_reference(layer, adapter, x, ts), rtol=0, atol=ATOL)


@pytest.mark.parametrize("t", [0.0, 600.0, 1000.0])
def test_sliced_ortho_at_init_is_exactly_the_base(t):
    layer = torch.nn.Linear(32, 20)
    adapter = ortho(20, 32, 8, 4, at_init=True)
    x = torch.randn(2, 7, 32)
    base = layer(x)
    state = RankState()
    handles = attach({"l": layer}, {"l": [adapter]}, state)
    with state.at(torch.tensor([t, t])):
        assert torch.equal(layer(x), base)
    detach(handles)


def test_non_prefix_columns_keep_the_mask_path():
    # Block-diagonal fused adapter: ranks repeat within one part, so a prefix slice would be wrong.
    layer = torch.nn.Linear(8, 12)
    g = torch.Generator().manual_seed(0)
    adapter = LowRankAdapter(torch.randn(6, 8, generator=g), torch.randn(12, 6, generator=g),
                             torch.arange(2).repeat(3), RankSchedule(2, 1))
    state = RankState()
    handles = attach({"l": layer}, {"l": [adapter]}, state)
    x, ts = torch.randn(2, 3, 8), torch.tensor([1000.0, 1000.0])
    with state.at(ts):
        got = layer(x)
        assert len(state._masks) == 1
    detach(handles)
    torch.testing.assert_close(got, masked_reference(layer, adapter, x, ts), rtol=0, atol=ATOL)


def test_uniform_rank_is_none_outside_a_call():
    state = RankState()
    assert state.uniform_rank(RankSchedule(4, 2)) is None
    with state.at(torch.tensor([10.0])):
        assert state.uniform_rank(RankSchedule(4, 2)) == 3
    assert state.uniform_rank(RankSchedule(4, 2)) is None


def test_in_place_update_only_without_autograd_and_equal_results():
    layer = torch.nn.Linear(12, 9)
    adapter = ortho(9, 12, 4, 2)
    fused = LowRankAdapter(adapter.down, adapter.up[:3], adapter.rank_index, adapter.schedule, 2,
                           out_rows=(3, 6))
    state = RankState()
    handles = attach({"l": layer}, {"l": [adapter, fused]}, state, strength=0.6)
    x = torch.randn(2, 3, 12, requires_grad=True)
    ts = torch.tensor([700.0, 700.0])
    with state.at(ts):
        with torch.no_grad():
            fast = layer(x)           # in place on the fresh output
        tracked = layer(x)            # autograd records the call: out-of-place
        tracked.sum().backward()
    detach(handles)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(fast, tracked.detach(), rtol=0, atol=ATOL)
    with torch.no_grad():
        masks = [rank_mask(active_rank(ts, 4, 2), a.rank_index) for a in (adapter, fused)]
        want = layer(x) + 0.6 * lowrank_delta(x, adapter.down, adapter.up, masks[0], 2)
        want[..., 3:6] += 0.6 * lowrank_delta(x, fused.down, fused.up, masks[1], 2)
    torch.testing.assert_close(fast, want, rtol=0, atol=ATOL)
