"""Trainer building blocks: target layers, trainable adapters, noise levels, loss, masks, state files."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def tr(pack):
    from comfyui_tlora import training  # noqa: F401  (import after bootstrap)
    from comfyui_tlora.training import inputs, loop, modules, objective, state, targets

    class NS:
        pass

    ns = NS()
    ns.inputs, ns.loop, ns.modules, ns.objective, ns.state, ns.targets = (
        inputs, loop, modules, objective, state, targets)
    return ns


def test_sdxl_targets_are_the_560_attention_linears(comfy, tr):
    model = comfy.build_model("sdxl", comfy.REAL_SDXL_CONFIG, device="meta")
    attention = tr.targets.find_targets(model.diffusion_model, "sdxl", "attention")
    names = [t.module for t in attention]
    assert len(names) == len(set(names)) == 560
    assert all(t.out_rows is None for t in attention)
    assert {n.rsplit(".attn", 1)[1][2:] for n in names} == {"to_q", "to_k", "to_v", "to_out.0"}
    with_ff = tr.targets.find_targets(model.diffusion_model, "sdxl", "attention+ff")
    # 70 transformer blocks, each with ff.net.0.proj and ff.net.2.
    assert len(with_ff) == 560 + 140


def test_flux_targets_split_fused_qkv_into_three_adapters(comfy, tr):
    model = comfy.build_model("flux", comfy.REAL_FLUX_CONFIG, device="meta")
    found = tr.targets.find_targets(model.diffusion_model, "flux", "attention")
    by_module: dict[str, list] = {}
    for t in found:
        by_module.setdefault(t.module, []).append(t.out_rows)
    h = 3072
    thirds = [(0, h), (h, 2 * h), (2 * h, 3 * h)]
    assert by_module["double_blocks.0.img_attn.qkv"] == thirds
    assert by_module["double_blocks.18.txt_attn.qkv"] == thirds
    assert by_module["double_blocks.5.img_attn.proj"] == [None]
    assert by_module["single_blocks.37.linear1"] == thirds   # q/k/v rows only, not the MLP rows
    assert "double_blocks.0.txt_attn.proj" not in by_module   # the reference never trains to_add_out
    assert len(found) == 19 * 7 + 38 * 3
    ff = tr.targets.find_targets(model.diffusion_model, "flux", "attention+ff")
    by_module_ff = {}
    for t in ff:
        by_module_ff.setdefault(t.module, []).append(t.out_rows)
    assert by_module_ff["single_blocks.0.linear1"] == thirds + [(3 * h, 3 * h + 4 * h)]
    assert by_module_ff["single_blocks.0.linear2"] == [None]
    assert by_module_ff["double_blocks.0.txt_mlp.2"] == [None]


def test_targets_reject_unknown_architecture_and_scope(comfy, tr):
    model = comfy.build_model("sdxl", device="meta")
    with pytest.raises(ValueError, match=f"knows {comfy.families.known_labels()}"):
        tr.targets.find_targets(model.diffusion_model, "nope")
    with pytest.raises(ValueError, match="scope"):
        tr.targets.find_targets(model.diffusion_model, "sdxl", "everything")


def _adapter(tr, variant: str, rank: int = 6, rows: int = 24, width: int = 20, seed: int = 0):
    target = tr.targets.TrainTarget("layer", None, rows, width)
    return tr.modules.TrainableAdapter(target, variant, rank, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["tlora", "ortho", "vanilla", "lora"])
def test_adapter_is_exactly_zero_at_init_under_every_mask(tr, variant):
    adapter = _adapter(tr, variant)
    x = torch.randn(3, 7, 20)
    for mask in (None, torch.ones(3, 6), (torch.rand(3, 6) > 0.5).float(), torch.zeros(3, 6)):
        assert torch.count_nonzero(adapter.delta(x, mask)) == 0
    for rank in (1, 3, 6):
        assert torch.count_nonzero(adapter.delta(x, rank=rank)) == 0


def _perturbed(tr, variant: str):
    adapter = _adapter(tr, variant, rank=6)
    with torch.no_grad():   # move off the init so every factor gets a gradient
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    return adapter


def _grads(adapter):
    if adapter.ortho:
        return ((adapter.A.grad, 0), (adapter.B.grad, 1), (adapter.S.grad, 0))
    return ((adapter.down.grad, 0), (adapter.up.grad, 1))


@pytest.mark.parametrize("variant", ["tlora", "vanilla"])
@pytest.mark.parametrize("how", ["mask", "rank"])
def test_masked_columns_get_exactly_zero_gradient(tr, variant, how):
    adapter = _perturbed(tr, variant)
    active = 2
    mask = (torch.arange(6) < active).float()[None]
    x = torch.randn(1, 5, 20)
    out = adapter.delta(x, mask) if how == "mask" else adapter.delta(x, rank=active)
    out.square().sum().backward()
    for grad, axis in _grads(adapter):
        assert torch.count_nonzero(grad.narrow(axis, active, 6 - active)) == 0
        kept = grad.narrow(axis, 0, active)
        assert torch.count_nonzero(kept) == kept.numel()


@pytest.mark.parametrize("rank", [None, 6, 3])
def test_one_step_factor_node_matches_the_per_adapter_autograd_graph(tr, rank):
    """AdapterSet.begin_step builds every Ortho adapter's factors in one autograd node with a
    hand-written backward: same values, same gradients as autograd through ``factors``; an adapter
    whose factors are not used gets no gradient."""
    adapters = []
    for seed, (rows, width) in enumerate([(24, 20), (16, 12), (24, 20)]):
        adapter = _adapter(tr, "tlora", rank=6, rows=rows, width=width, seed=seed)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + seed)))
        adapters.append(adapter)
    used = adapters[:2]
    weights = [torch.randn(f.shape, generator=torch.Generator().manual_seed(20 + i))
               for i, f in enumerate(t for a in used for t in a.factors(rank))]

    def grads_after(factors):
        loss = sum((w * f).sum() for w, f in zip(weights, factors[:2 * len(used)]))
        for a in adapters:
            a.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad for a in adapters for p in (a.A, a.B, a.S)]

    reference = [t for a in adapters for t in a.factors(rank)]
    expected = grads_after(reference)
    built = tr.modules.OrthoStepFactors.apply(
        rank, [(a.A_init, a.B_init, a.S_init) for a in adapters],
        *[p for a in adapters for p in (a.A, a.B, a.S)])
    for got, want in zip(built, reference):
        assert torch.equal(got, want)
    got_grads = grads_after(list(built))
    for got, want in zip(got_grads[:6], expected[:6]):
        # Same products; autograd may sum the two paths into A in the other order.
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert got_grads[6:] == [None, None, None] and expected[6:] == [None, None, None]
    if rank == 3:
        for got, axis in ((got_grads[0], 0), (got_grads[1], 1), (got_grads[2], 0)):
            assert torch.count_nonzero(got.narrow(axis, 3, 3)) == 0


@pytest.mark.parametrize("variant", ["tlora", "ortho", "vanilla", "lora"])
def test_adapter_memory_counts_what_a_run_allocates(tr, variant):
    """The bytes the trainer asks ComfyUI to free match the tensors a run really holds."""
    found = [tr.targets.TrainTarget(f"l{i}", None, rows, width) for i, (rows, width) in
             enumerate([(24, 20), (16, 12)])]
    adapters = tr.modules.AdapterSet(found, variant, 6, seed=0)
    params = sum(p.numel() for p in adapters.parameters())
    buffers = sum(b.numel() for b in adapters.buffers())
    ortho = variant in ("tlora", "ortho")   # other variants' factors are views of the parameters
    factors = sum(t.numel() for a in adapters.adapters for t in a.factors(None)) if ortho else 0
    need = tr.modules.adapter_memory(found, variant, 6)
    assert need["trainable_params"] == params
    # fp32 parameters, gradients, two AdamW moments, frozen buffers; factors and their gradients.
    assert need["state_bytes"] == 4 * (4 * params + buffers)
    assert need["step_factor_bytes"] == 4 * 2 * factors


@pytest.mark.parametrize("variant", ["tlora", "vanilla"])
def test_sliced_rank_equals_the_mask(tr, variant):
    adapter = _perturbed(tr, variant)
    x = torch.randn(2, 5, 20)
    mask = (torch.arange(6) < 4).float().expand(2, 6)
    # Same sum without the masked (zero) terms: float32 summation order only.
    torch.testing.assert_close(adapter.delta(x, rank=4), adapter.delta(x, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["tlora", "vanilla"])
def test_step_plan_slices_to_the_batch_max_rank_and_masks_the_rest(tr, pack, variant):
    # Samples at ranks 3 and 4 of 6 (r_min 2): columns 4, 5 are sliced away for both, column 3 is
    # masked for the first sample only; each sample must equal its own full-mask delta.
    from comfyui_tlora.tlora_core.adapter import RankSchedule

    adapter = _perturbed(tr, variant)
    state = tr.modules.RankState(strict=True)
    t = torch.tensor([600.0, 400.0])
    state.set(t)
    plan = state.plan(RankSchedule(6, 2), torch.device("cpu"))
    mask, rank = plan.mask, plan.keep
    assert rank == 4 and mask.shape == (2, 4) and mask[0].tolist() == [1, 1, 1, 0]
    x = torch.randn(2, 5, 20)
    got = adapter.delta(x, mask, rank)
    for b, active in enumerate((3, 4)):
        full = (torch.arange(6) < active).float()[None]
        # Same sum without the zero terms: float32 summation order only.
        torch.testing.assert_close(got[b:b + 1], adapter.delta(x[b:b + 1], full), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["tlora", "vanilla"])
def test_exported_adapter_computes_the_training_delta(tr, pack, variant):
    adapter = _adapter(tr, variant, rank=6)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.2 * torch.randn(p.shape))
    schedule = pack.tlora_core.adapter.RankSchedule(6, 3)
    exported = adapter.export(schedule, torch.arange(6).repeat(adapter.parts))
    x = torch.randn(2, 4, 20)
    active = torch.tensor([3, 6])
    mask = (torch.arange(6)[None] < active[:, None]).float()
    expected = adapter.delta(x, mask).detach()
    # The Loader's mask covers every column: [m | m] for Ortho's two parts.
    got = pack.tlora_core.adapter.lowrank_delta(x, exported.down, exported.up,
                                                mask.repeat(1, adapter.parts), exported.parts)
    # Same math in another association order (B S folded): float32 rounding only.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert exported.out_rows is None and exported.schedule == schedule


def test_add_rows_places_fused_deltas_on_their_rows(tr):
    out = torch.zeros(2, 3, 10)
    d1, d2 = torch.ones(2, 3, 3), 2 * torch.ones(2, 3, 3)
    got = tr.modules._add_rows(out, [((4, 7), d2), ((0, 3), d1)])
    assert got[..., :3].eq(1).all() and got[..., 3].eq(0).all()
    assert got[..., 4:7].eq(2).all() and got[..., 7:].eq(0).all()


def test_step_draws_depend_only_on_seed_and_step(tr):
    a = torch.rand(4, generator=tr.loop.step_generator(7, 3))
    b = torch.rand(4, generator=tr.loop.step_generator(7, 3))
    c = torch.rand(4, generator=tr.loop.step_generator(7, 4))
    d = torch.rand(4, generator=tr.loop.step_generator(8, 3))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    seen = [i for step in range(6) for i in tr.loop.sample_indices(3, 2, step, seed=1)]
    assert sorted(seen) == [0] * 4 + [1] * 4 + [2] * 4   # each image equally often
    assert tr.loop.sample_indices(1, 2, 0, seed=1) == [0, 0]


def test_noise_levels_match_the_loaders_timesteps(comfy, pack, tr):
    from comfyui_tlora.training.timesteps import schedule_timesteps

    for family in ("sdxl", "flux"):
        ms = comfy.build_model(family).model.model_sampling
        sigma, t = tr.objective.draw_noise_levels(ms, 64, torch.Generator().manual_seed(0))
        # The Loader derives the schedule timestep from sigma alone: it must be the trained one.
        torch.testing.assert_close(schedule_timesteps(ms, sigma), t, rtol=0, atol=1e-4)
        if family == "sdxl":
            assert torch.equal(t, t.round()) and 0 <= t.min() and t.max() <= 999
            assert torch.equal(sigma, ms.sigmas[t.long()])
        else:
            assert 0 <= float(sigma.min()) and float(sigma.max()) < 1


def test_native_targets(comfy, tr):
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sigma = torch.tensor([0.3, 2.0])
    eps_ms = comfy.build_model("sdxl").model.model_sampling
    x_t, target = tr.objective.noisy_input_and_target(eps_ms, x0, noise, sigma)
    torch.testing.assert_close(x_t, x0 + sigma[:, None, None, None] * noise)
    assert torch.equal(target, noise)
    flow_ms = comfy.build_model("flux").model.model_sampling
    s = torch.tensor([0.25, 0.75])
    x_t, target = tr.objective.noisy_input_and_target(flow_ms, x0, noise, s)
    torch.testing.assert_close(x_t, (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise)
    torch.testing.assert_close(target, noise - x0)


def test_weighted_mse_is_the_mse_inside_the_mask(tr):
    pred, target = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    plain = ((pred - target) ** 2).mean()
    torch.testing.assert_close(tr.objective.weighted_mse(pred, target), plain)
    torch.testing.assert_close(tr.objective.weighted_mse(pred, target, torch.ones(2, 1, 6, 6)), plain)
    w = torch.zeros(2, 1, 6, 6)
    w[..., :3, :] = 1
    inside = ((pred - target) ** 2)[..., :3, :].mean()
    torch.testing.assert_close(tr.objective.weighted_mse(pred, target, w), inside)


def test_loss_weights_resize_and_reject_bad_masks(tr):
    samples = torch.zeros(2, 4, 8, 12)
    pixel = torch.zeros(64, 96)
    pixel[:, :48] = 1
    w = tr.inputs.loss_weights(pixel, samples, 8)
    assert w.shape == (2, 1, 8, 12)
    assert w[..., :6].eq(1).all() and w[..., 6:].eq(0).all()
    assert tr.inputs.loss_weights(torch.ones(2, 8, 12), samples, 8).shape == (2, 1, 8, 12)
    assert tr.inputs.loss_weights(None, samples, 8) is None
    with pytest.raises(ValueError, match="image is 96x64"):
        tr.inputs.loss_weights(torch.ones(1, 60, 96), samples, 8)
    with pytest.raises(ValueError, match="3 masks for 2 images"):
        tr.inputs.loss_weights(torch.ones(3, 8, 12), samples, 8)
    with pytest.raises(ValueError, match="empty"):
        tr.inputs.loss_weights(torch.zeros(8, 12), samples, 8)
    # A VAE that scales 16x (FLUX.2): the image is twice as large, and the 8x size is refused.
    assert tr.inputs.loss_weights(torch.ones(128, 192), samples, 16).shape == (2, 1, 8, 12)
    with pytest.raises(ValueError, match="image is 192x128"):
        tr.inputs.loss_weights(pixel, samples, 16)


def test_5d_latents_get_one_frame_weights_and_the_same_masked_loss(tr):
    # Wan 2.1 VAE latents (images, channels, 1 frame, h, w): the mask weighs every channel and
    # frame of its image, and the masked loss is the 4-D one of the same values.
    samples = torch.zeros(2, 16, 1, 8, 12)
    pixel = torch.zeros(64, 96)
    pixel[:, :48] = 1
    w5 = tr.inputs.loss_weights(pixel, samples, 8)
    assert w5.shape == tr.inputs.latent_weight_shape(samples) == (2, 1, 1, 8, 12)
    w4 = tr.inputs.loss_weights(pixel, samples[:, :, 0], 8)
    assert torch.equal(w5[:, :, 0], w4)
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 16, 1, 8, 12, generator=gen), torch.randn(2, 16, 1, 8, 12, generator=gen)
    torch.testing.assert_close(tr.objective.weighted_mse(pred, target, w5),
                               tr.objective.weighted_mse(pred[:, :, 0], target[:, :, 0], w4))
    inside = ((pred - target) ** 2)[..., :6].mean()
    torch.testing.assert_close(tr.objective.weighted_mse(pred, target, w5), inside)


def test_state_file_roundtrip_restores_adapters_and_optimizer(tr, tmp_path):
    targets = [tr.targets.TrainTarget("a", None, 12, 10), tr.targets.TrainTarget("b", (0, 6), 18, 10)]
    adapters = tr.modules.AdapterSet(targets, "tlora", 4, seed=3)
    config = tr.loop.TrainConfig(rank=4, min_rank=2)
    opt = tr.loop._optimizer(adapters, config, torch.device("cpu"))
    for _ in range(2):
        loss = sum(a.delta(torch.randn(2, 10), None).square().sum() + a.S.sum() for a in adapters.adapters)
        loss.backward()
        opt.step()
        opt.zero_grad()
    identity = {"architecture": "sdxl", "variant": "tlora", "rank": 4, "scope": "attention"}
    snap = tr.state.capture(2, [0.5, 0.25], identity, adapters, opt)
    path = tr.state.save_state(tmp_path / "x.tlora-state", snap)
    assert [p.name for p in tmp_path.iterdir()] == ["x.tlora-state"]   # no temp file left
    loaded = tr.state.load_state(path)
    assert loaded.step == 2 and loaded.losses == [0.5, 0.25] and loaded.adapter_keys == ["a", "b@0:6"]
    fresh = tr.modules.AdapterSet(targets, "tlora", 4, seed=99)
    fresh_opt = tr.loop._optimizer(fresh, config, torch.device("cpu"))
    tr.state.check_compatible(loaded, identity, fresh.keys(), steps=3)
    tr.state.restore(loaded, fresh, fresh_opt)
    for mine, theirs in zip(adapters.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(mine, theirs)
    for p_old, p_new in zip(adapters.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p_old][key].reshape(()) if key == "step" else opt.state[p_old][key],
                               fresh_opt.state[p_new][key].reshape(()) if key == "step" else fresh_opt.state[p_new][key])
    with pytest.raises(ValueError, match="rank"):
        tr.state.check_compatible(loaded, {**identity, "rank": 8}, fresh.keys(), steps=3)
    with pytest.raises(ValueError, match="already at step 2"):
        tr.state.check_compatible(loaded, identity, fresh.keys(), steps=2)


def test_config_metadata_is_json_with_every_setting(tr):
    import json

    text = tr.loop.TrainConfig(variant="lora", rank=8, steps=5).as_json(step=5)
    d = json.loads(text)
    assert d["variant"] == "lora" and d["rank"] == 8 and d["step"] == 5 and d["optimizer"] == "AdamW"
    assert "min_rank" not in d   # plain LoRA has no schedule
    assert math.isclose(d["weight_decay"], 1e-4) and d["betas"] == [0.9, 0.999]
