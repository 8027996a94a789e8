"""Adapter math and forward hooks: per-sample masks, the Ortho difference, dtypes, fused rows."""

from __future__ import annotations

import pytest
import torch

from tlora_core.adapter import LowRankAdapter, RankSchedule, add_delta, lowrank_delta
from tlora_core.apply import attach, detach
from tlora_core.masks import RankState
from tlora_core.schedule import active_rank


def ortho_adapter(n: int, m: int, r: int, min_rank: int, seed: int = 0, trained: bool = True,
                  out_rows=None) -> tuple[LowRankAdapter, dict]:
    g = torch.Generator().manual_seed(seed)
    A0, B0, S0 = torch.randn(r, m, generator=g), torch.randn(n, r, generator=g), torch.rand(r, generator=g) + 0.1
    if trained:
        A, B, S = A0 + 0.1 * torch.randn(r, m, generator=g), B0 + 0.1 * torch.randn(n, r, generator=g), S0 * 1.3
    else:
        A, B, S = A0.clone(), B0.clone(), S0.clone()
    adapter = LowRankAdapter(down=torch.cat([A, A0]), up=torch.cat([B * S, -B0 * S0], 1),
                             rank_index=torch.arange(r).repeat(2), schedule=RankSchedule(r, min_rank),
                             parts=2, out_rows=out_rows)
    return adapter, {"A": A, "B": B, "S": S, "A0": A0, "B0": B0, "S0": S0}


def reference_ortho_weight(f: dict, active: int) -> torch.Tensor:
    """Paper Eq. 8: delta W = B S M A - B0 S0 M A0, with M keeping the first `active` ranks."""
    m = (torch.arange(f["S"].numel()) < active).float()
    return f["B"] @ torch.diag(f["S"] * m) @ f["A"] - f["B0"] @ torch.diag(f["S0"] * m) @ f["A0"]


@pytest.mark.parametrize("r,min_rank", [(8, 4), (6, 1), (4, 4)])
def test_hook_matches_per_sample_hand_merged_weights(r, min_rank):
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 10)
    adapter, f = ortho_adapter(10, 12, r, min_rank)
    state = RankState()
    handles = attach({"layer": layer}, {"layer": [adapter]}, state, strength=0.7)
    x = torch.randn(3, 5, 12)
    t = torch.tensor([999.0, 500.0, 0.0])
    with state.at(t):
        y = layer(x)
    detach(handles)
    for b, active in enumerate(active_rank(t, r, min_rank).tolist()):
        w = layer.weight + 0.7 * reference_ortho_weight(f, active)
        expected = x[b] @ w.T + layer.bias
        # float32, K = 12 + r terms per output: a few ulps of |y| ~ 10.
        torch.testing.assert_close(y[b], expected, rtol=1e-5, atol=1e-5)


def test_samples_get_different_masks():
    layer = torch.nn.Linear(6, 4)
    adapter, _ = ortho_adapter(4, 6, 8, 1)
    state = RankState()
    handles = attach({"l": layer}, {"l": [adapter]}, state)
    x = torch.randn(1, 3, 6).repeat(2, 1, 1)
    with state.at(torch.tensor([1000.0, 0.0])):
        y = layer(x)
    detach(handles)
    assert not torch.allclose(y[0], y[1]), "different timesteps must give different outputs"


def test_ortho_output_is_exactly_zero_at_init_under_every_mask():
    adapter, _ = ortho_adapter(16, 24, 8, 1, trained=False)
    x = torch.randn(9, 7, 24)
    for active in range(1, 9):
        mask = (torch.arange(8).repeat(2) < active).float().expand(9, -1)
        delta = lowrank_delta(x, adapter.down, adapter.up, mask, parts=2)
        assert torch.equal(delta, torch.zeros_like(delta)), active


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_base_keeps_the_delta_precision(dtype):
    # The Ortho difference of two nearly equal terms computed in float32, cast once at the end.
    layer = torch.nn.Linear(32, 16).to(dtype)
    adapter, f = ortho_adapter(16, 32, 8, 4)
    state = RankState()
    handles = attach({"l": layer}, {"l": [adapter]}, state)
    x = torch.randn(2, 4, 32).to(dtype)
    with state.at(torch.tensor([0.0, 0.0])):
        y = layer(x)
    detach(handles)
    assert y.dtype == dtype
    exact = x.double() @ (layer.weight.double() + reference_ortho_weight(f, 8).double()).T + layer.bias.double()
    # Only the final rounding to `dtype` (and the base layer's own low-precision matmul) remains.
    eps = torch.finfo(dtype).eps
    base_err = (layer(x).double() - x.double() @ layer.weight.double().T - layer.bias.double()).abs().max()
    assert (y.double() - exact).abs().max() <= base_err + 2 * eps * exact.abs().max()


def test_fused_rows_only_touch_their_slice():
    layer = torch.nn.Linear(8, 12)
    q, _ = ortho_adapter(4, 8, 2, 1, seed=1, out_rows=(0, 4))
    v, _ = ortho_adapter(4, 8, 2, 1, seed=2, out_rows=(8, 12))
    state = RankState()
    x = torch.randn(1, 3, 8)
    base = layer(x)
    handles = attach({"l": layer}, {"l": [q, v]}, state)
    y = layer(x)
    detach(handles)
    assert torch.equal(y[..., 4:8], base[..., 4:8])
    assert not torch.allclose(y[..., :4], base[..., :4])
    assert not torch.allclose(y[..., 8:], base[..., 8:])


def test_detach_restores_bit_identical_outputs_and_strength_zero_is_base():
    layer = torch.nn.Linear(8, 8)
    adapter, _ = ortho_adapter(8, 8, 4, 2)
    x = torch.randn(2, 3, 8)
    before = layer(x)
    state = RankState()
    handles = attach({"l": layer}, {"l": [adapter]}, state, strength=0.0)
    with state.at(torch.tensor([10.0, 900.0])):
        assert torch.equal(layer(x), before)
    detach(handles)
    handles = attach({"l": layer}, {"l": [adapter]}, state, strength=1.0)
    detach(handles)
    assert torch.equal(layer(x), before)


def test_attach_refuses_missing_modules_without_registering_anything():
    layer = torch.nn.Linear(4, 4)
    adapter, _ = ortho_adapter(4, 4, 2, 1)
    with pytest.raises(KeyError, match="not modules of this model"):
        attach({"a": layer}, {"a": [adapter], "missing.to_q": [adapter]}, RankState())
    assert not layer._forward_hooks


def test_mask_batch_mismatch_is_a_clear_error():
    adapter, _ = ortho_adapter(4, 4, 2, 1)
    with pytest.raises(ValueError, match="per-sample masks need matching batch sizes"):
        lowrank_delta(torch.randn(3, 2, 4), adapter.down, adapter.up, torch.ones(2, 4), parts=2)


def test_masks_are_computed_once_per_call_and_shared_by_layers():
    layers = {f"l{i}": torch.nn.Linear(4, 4) for i in range(3)}
    adapter, _ = ortho_adapter(4, 4, 2, 1)
    state = RankState()
    handles = attach(layers, {name: [adapter] for name in layers}, state)
    with state.at(torch.tensor([900.0, 0.0])):   # samples at different ranks: the mask path
        for layer in layers.values():
            layer(torch.randn(2, 2, 4))
        assert len(state._masks) == 1 and len(state._active) == 1
    assert state.timesteps is None and not state._masks
    detach(handles)


def test_unmasked_adapter_and_add_delta_rows():
    adapter = LowRankAdapter(down=torch.randn(3, 5), up=torch.randn(6, 3), rank_index=torch.arange(3))
    assert adapter.schedule is None
    state = RankState()
    assert state.mask_for(adapter, adapter.rank_index, torch.float32) is None
    base = torch.zeros(2, 6, dtype=torch.float16)
    out = add_delta(base, torch.ones(2, 2), 2.0, out_rows=(1, 3))
    assert out.dtype == torch.float16 and out[:, 1:3].eq(2).all() and out[:, [0, 3, 4, 5]].eq(0).all()


def test_adapter_shape_validation():
    with pytest.raises(ValueError, match="shapes do not fit"):
        LowRankAdapter(down=torch.randn(3, 5), up=torch.randn(6, 4), rank_index=torch.arange(3))
    with pytest.raises(ValueError, match="equal parts"):
        LowRankAdapter(down=torch.randn(3, 5), up=torch.randn(6, 3), rank_index=torch.arange(3), parts=2)
    with pytest.raises(ValueError, match="out_rows"):
        LowRankAdapter(down=torch.randn(3, 5), up=torch.randn(6, 3), rank_index=torch.arange(3), out_rows=(0, 4))


def test_hold_keeps_the_call_masks_until_it_ends():
    # Training on a MODEL carrying a T-LoRA: layers re-run in backward must see the call's masks.
    state = RankState()
    schedule = RankSchedule(8, 2)
    t = torch.tensor([900.0, 100.0])
    with state.hold():
        with state.hold():   # nested holds: only the outermost end clears
            with state.at(t):
                during = state.active(schedule).clone()
            assert torch.equal(state.active(schedule), during)
        assert torch.equal(state.timesteps, t)
    assert state.timesteps is None and state.active(schedule) is None
    with state.at(t):   # without a hold, the call clears as before
        pass
    assert state.timesteps is None
