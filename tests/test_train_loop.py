"""The training loop on the real ComfyUI runtime with tiny SDXL and FLUX models.

Models and inputs are inference tensors (as node outputs are), so every test also covers the
inference-mode trap; FLUX tests also cover its in-place blocks (checkpointing forced on).
"""

from __future__ import annotations

import pytest
import torch
import train_helpers as th

import comfy_runtime
import family_configs

pytestmark = pytest.mark.comfy

# SDXL trains the paper's T-LoRA; FLUX the reference code's Vanilla T-LoRA (and T-LoRA where noted).
VARIANT = {"sdxl": "tlora", "flux": "vanilla"}


@pytest.fixture(scope="module")
def tl(pack):
    from comfyui_tlora.training import loop, modules, objective, prepare, targets

    return loop, modules, objective, prepare, targets


def _prediction(tp, data, sigma, noise_seed=0):
    from comfyui_tlora.training.objective import NativePredictor, noisy_input_and_target

    x0, conds, _ = data.batch([0] * len(sigma), torch.device("cpu"))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(noise_seed))
    x_t, target = noisy_input_and_target(tp.model.model_sampling, x0, noise, sigma)
    return NativePredictor(tp)(x_t, sigma, conds), target


def _sigmas(model, timesteps):
    ms = model.model.model_sampling
    if model.model.model_type.name == "FLUX":
        return torch.tensor(timesteps, dtype=torch.float32) / 1000
    return ms.sigmas[torch.tensor(timesteps)]


def test_ortho_init_leaves_the_model_output_unchanged(family, tl):
    loop, modules, _, prepare, targets = tl
    model, latents, positive = th.node_inputs(family)
    with torch.inference_mode():
        data = th.training_data(model, latents, positive)
        with torch.inference_mode(False), torch.enable_grad(), prepare.trainable_model(
                model, gradient_checkpointing=False) as tp:
            sigma = _sigmas(model, [999, 500, 10])
            base, _ = _prediction(tp, data, sigma)
            found = targets.find_targets(tp.model.diffusion_model, family_configs.registry_id(family))
            adapters = modules.AdapterSet(found, "tlora", 4, seed=0)
            adapters.attach(tp.model.diffusion_model, modules.RankState(strict=True),
                            loop.TrainConfig(rank=4, min_rank=2).schedule())
            try:
                adapters.begin_step(torch.tensor([999.0, 500.0, 10.0]))
                with_adapters, _ = _prediction(tp, data, sigma)
                assert adapters.adapters[0].step_factors is not None   # the loop's per-step factors
            finally:
                adapters.detach()
    assert torch.equal(base, with_adapters)


def _perturbed_gradients(tl, family, variant, rank, min_rank, timesteps, checkpointing):
    """Adapters moved off their init (so every factor gets a gradient), one loss backward at
    ``timesteps`` through the loop's per-step path; returns the AdapterSet."""
    loop, modules, objective, prepare, targets = tl
    model, latents, positive = th.node_inputs(family)
    with torch.inference_mode():
        data = th.training_data(model, latents, positive)
        with torch.inference_mode(False), torch.enable_grad(), prepare.trainable_model(
                model, gradient_checkpointing=checkpointing) as tp:
            found = targets.find_targets(tp.model.diffusion_model, family_configs.registry_id(family))
            adapters = modules.AdapterSet(found, variant, rank, seed=0)
            with torch.no_grad():
                for p in adapters.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
            schedule = loop.TrainConfig(rank=rank, min_rank=min_rank).schedule()
            adapters.attach(tp.model.diffusion_model, modules.RankState(strict=True), schedule)
            try:
                adapters.begin_step(torch.tensor(timesteps, dtype=torch.float32))
                pred, target = _prediction(tp, data, _sigmas(model, timesteps))
                objective.weighted_mse(pred, target).backward()
            finally:
                adapters.detach()
    return adapters


@pytest.mark.parametrize("variant", ["tlora", "vanilla"])
def test_masked_columns_get_zero_gradient_at_a_high_timestep(family, variant, tl):
    rank, min_rank = 4, 1
    # r(999) = min_rank: columns 1.. are masked. With checkpointing: the per-step factors are
    # built outside the checkpointed blocks and reused by their recomputation.
    adapters = _perturbed_gradients(tl, family, variant, rank, min_rank, [999], checkpointing=True)
    for adapter in adapters.adapters:
        if variant == "tlora":
            grads = ((adapter.A.grad, 0), (adapter.B.grad, 1), (adapter.S.grad, 0))
        else:
            grads = ((adapter.down.grad, 0), (adapter.up.grad, 1))
        for grad, axis in grads:
            assert torch.count_nonzero(grad.narrow(axis, min_rank, rank - min_rank)) == 0
            assert torch.count_nonzero(grad.narrow(axis, 0, min_rank)) > 0


@pytest.mark.parametrize("variant", ["tlora", "vanilla"])
def test_checkpointing_reuses_the_step_factors_and_gives_the_same_gradients(variant, tl):
    """The per-step factors are built once, outside the checkpointed blocks, and reused by their
    recomputation: the gradients must equal those of a run without checkpointing."""
    # Two samples at different ranks: the sliced + masked path.
    runs = {checkpointing: _perturbed_gradients(tl, "sdxl", variant, 4, 2, [700, 100], checkpointing)
            for checkpointing in (False, True)}
    grads = {checkpointing: [p.grad for p in adapters.parameters()] for checkpointing, adapters in runs.items()}
    adapters = runs[True]
    assert all(adapter.step_factors is None for adapter in adapters.adapters)   # dropped by detach
    for plain, checkpointed in zip(grads[False], grads[True]):
        assert torch.count_nonzero(plain) > 0
        # The same forward recomputed: float32 summation order in the backward only.
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-9)


def test_training_lowers_the_loss_and_restores_the_model(family, tl):
    model, latents, positive = th.node_inputs(family)
    before = th.snapshot(model)
    base_loss = th.fixed_pair_loss(model, latents, positive)
    result = th.train(model, latents, positive, variant=VARIANT.get(family, comfy_runtime.family_spec(family).recipe.variant), rank=4, min_rank=2, steps=30,
                      learning_rate=3e-2, seed=0, gradient_checkpointing=False)
    th.assert_restored(before, model)
    assert len(result.losses) == 30 and all(torch.isfinite(torch.tensor(result.losses)))
    trained_loss = th.fixed_pair_loss(th.apply(model, result.weights), latents, positive)
    # Deterministic pairs: any drop is real; the tiny random models leave ~1.0 of unlearnable noise
    # variance, so the learnable part is small (observed drops: SDXL ~0.2%, FLUX ~5%).
    assert trained_loss < base_loss - 1e-3, (base_loss, trained_loss)
    # The same pairs on the untouched input MODEL still give the base loss: nothing leaked.
    assert th.fixed_pair_loss(model, latents, positive) == base_loss


def test_same_seed_same_result_and_another_seed_differs():
    model, latents, positive = th.node_inputs("flux")
    runs = [th.train(model, latents, positive, variant="tlora", rank=4, min_rank=2, steps=3,
                     learning_rate=1e-2, seed=seed) for seed in (4, 4, 5)]
    first, again, other = ([a.up for g in r.weights.adapters.values() for a in g] for r in runs)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert runs[0].losses == runs[1].losses
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_nan_loss_stops_with_a_clear_error_and_restores(tl):
    import comfy.patcher_extension

    loop = tl[0]
    model, latents, positive = th.node_inputs("sdxl")
    poisoned = model.clone()

    def nan_output(executor, *args, **kwargs):
        return executor(*args, **kwargs) * float("nan")

    poisoned.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_nan", nan_output)
    before = th.snapshot(model)
    with pytest.raises(loop.TrainingDiverged, match="loss became nan at step 1"):
        th.train(poisoned, latents, positive, rank=4, min_rank=2, steps=5)
    th.assert_restored(before, model)


def test_cancel_stops_within_a_step_restores_and_resets_the_flag():
    import comfy.model_management as mm

    model, latents, positive = th.node_inputs("flux")
    before = th.snapshot(model)
    seen = []

    def cancel_at_two(step, total, loss, losses):
        seen.append(step)
        if step == 2:
            mm.interrupt_current_processing(True)

    with pytest.raises(mm.InterruptProcessingException):
        th.train(model, latents, positive, rank=4, min_rank=2, steps=50, on_step=cancel_at_two)
    assert seen == [1, 2]
    assert not mm.processing_interrupted()
    th.assert_restored(before, model)


def test_cancel_during_the_forward_pass_stops_that_step():
    import comfy.model_management as mm
    import comfy.patcher_extension

    model, latents, positive = th.node_inputs("sdxl")
    before = th.snapshot(model)
    cancelling = model.clone()
    calls = []

    def cancel_mid_forward(executor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            # Pressing Cancel while the UNet runs: ComfyUI's next layer raises.
            mm.interrupt_current_processing(True)
        return executor(*args, **kwargs)

    cancelling.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_cancel",
                                    cancel_mid_forward)
    steps = []
    with pytest.raises(mm.InterruptProcessingException):
        th.train(cancelling, latents, positive, rank=4, min_rank=2, steps=50,
                 on_step=lambda step, *_: steps.append(step))
    assert steps == [1] and len(calls) == 2
    assert not mm.processing_interrupted()
    th.assert_restored(before, model)


def test_bf16_training_leaves_sampling_with_the_input_model_unchanged(comfy):
    model, latents, positive = th.node_inputs("sdxl")
    reference = comfy.sample(model, "sdxl", steps=2, size=8, seed=3)
    before = th.snapshot(model)
    result = th.train(model, latents, positive, rank=4, min_rank=2, steps=2, compute_dtype="bf16")
    assert all(torch.isfinite(torch.tensor(result.losses)))
    th.assert_restored(before, model)   # including the BaseModel's manual_cast_dtype
    assert torch.equal(comfy.sample(model, "sdxl", steps=2, size=8, seed=3), reference)


def test_fp8_flux_base_trains_with_bf16_compute():
    import comfy_runtime

    with torch.inference_mode():
        model = comfy_runtime.build_model("flux", dtype=torch.float8_e4m3fn)
    _, latents, positive = th.node_inputs("flux")
    before = th.snapshot(model)
    result = th.train(model, latents, positive, rank=4, min_rank=2, steps=2, compute_dtype="bf16")
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(a.up.dtype == torch.float32 for g in result.weights.adapters.values() for a in g)
    th.assert_restored(before, model)


def test_each_sample_gets_the_mask_of_its_own_timestep(tl):
    """Batch (t=999, t=0): the gradient is the mean of the two single-sample gradients, so the
    ranks masked at t=999 get only the t=0 sample's half."""
    loop, modules, objective, prepare, targets = tl
    model, latents, positive = th.node_inputs("sdxl")
    rank, min_rank = 4, 1
    with torch.inference_mode():
        data = th.training_data(model, latents, positive)
        with torch.inference_mode(False), torch.enable_grad(), prepare.trainable_model(
                model, gradient_checkpointing=False) as tp:
            found = targets.find_targets(tp.model.diffusion_model, "sdxl")
            adapters = modules.AdapterSet(found, "tlora", rank, seed=0)
            schedule = loop.TrainConfig(rank=rank, min_rank=min_rank).schedule()
            predictor = objective.NativePredictor(tp)
            x0, conds, _ = data.batch([0, 0], torch.device("cpu"))
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
            t = torch.tensor([999.0, 0.0])
            sigma = _sigmas(model, [999, 0])
            x_t, target = objective.noisy_input_and_target(tp.model.model_sampling, x0, noise, sigma)
            adapters.attach(tp.model.diffusion_model, modules.RankState(strict=True), schedule)
            grads = {}
            try:
                for name, idx in (("batch", [0, 1]), ("high", [0]), ("low", [1])):
                    adapters.zero_grad(set_to_none=True)
                    adapters.begin_step(t[idx])
                    c = {k: v[idx] for k, v in conds.items()}
                    objective.weighted_mse(predictor(x_t[idx], sigma[idx], c), target[idx]).backward()
                    adapters.end_step()
                    grads[name] = [p.grad.clone() for p in adapters.parameters()]
            finally:
                adapters.detach()
    for batch, high, low in zip(grads["batch"], grads["high"], grads["low"]):
        # One batched forward vs two single ones: float32 summation order only.
        torch.testing.assert_close(batch, (high + low) / 2, rtol=1e-4, atol=1e-9)
    assert len(grads["high"]) == 3 * len(adapters.adapters)   # (A, B, S) per adapter
    for g_a, g_b, g_s in zip(*[iter(grads["high"])] * 3):
        assert torch.count_nonzero(g_a[min_rank:]) == 0 and torch.count_nonzero(g_b[:, min_rank:]) == 0
        assert torch.count_nonzero(g_s[min_rank:]) == 0


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_training_on_a_model_that_already_carries_a_tlora(family):
    """Train a second T-LoRA on the output of T-LoRA Loader: the first one stays active during
    training, the input MODEL is left as it was, and the stacked result lowers the loss."""
    model, latents, positive = th.node_inputs(family)
    settings = {"variant": "tlora", "rank": 4, "min_rank": 2, "learning_rate": 3e-2}
    first = th.train(model, latents, positive, steps=20, seed=0, gradient_checkpointing=False, **settings)
    carrying = th.apply(model, first.weights)
    base_loss = th.fixed_pair_loss(model, latents, positive)
    carrying_loss = th.fixed_pair_loss(carrying, latents, positive)
    assert carrying_loss != base_loss
    # An Ortho run's first step changes nothing, so its loss is that of the MODEL it trains on.
    step0 = {name: th.train(m, latents, positive, steps=1, seed=1, **settings).losses[0]
             for name, m in (("base", model), ("carrying", carrying))}
    assert step0["base"] != step0["carrying"], "the first T-LoRA was not active during training"
    before = th.snapshot(carrying)
    second = th.train(carrying, latents, positive, steps=30, seed=1, gradient_checkpointing=True, **settings)
    th.assert_restored(before, carrying)
    assert th.fixed_pair_loss(carrying, latents, positive) == carrying_loss
    stacked = th.fixed_pair_loss(th.apply(carrying, second.weights), latents, positive)
    assert stacked < carrying_loss - 1e-3, (carrying_loss, stacked)
    # Checkpointing re-runs the first T-LoRA's layers in backward: they must see the same masks.
    short = {ckpt: th.train(carrying, latents, positive, steps=3, seed=2, gradient_checkpointing=ckpt,
                            **settings) for ckpt in (False, True)}
    # The same computation recomputed: float32 summation order in the backward only.
    torch.testing.assert_close(short[True].losses, short[False].losses, rtol=1e-5, atol=0)


def test_training_asks_comfyui_for_room_for_its_working_set(tl, monkeypatch):
    """Before loading, the trainer tells ComfyUI how much it needs beside the weights (the run's
    working set: adapters, optimizer, activations, ...), so other models (text encoders, VAE) are
    unloaded from the GPU first and the layers that do not fit beside it stream."""
    import comfy.model_management

    loop, modules, _, _, targets = tl
    model, latents, positive = th.node_inputs("sdxl")
    calls = []
    original = comfy.model_management.load_models_gpu

    def recording(models, *args, **kwargs):
        calls.append(kwargs.get("memory_required", 0))
        return original(models, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", recording)
    th.train(model, latents, positive, variant="tlora", rank=4, min_rank=2, steps=1, seed=0,
             gradient_checkpointing=False)
    found = targets.find_targets(model.model.diffusion_model, "sdxl")
    config = loop.TrainConfig(variant="tlora", rank=4, min_rank=2, steps=1, gradient_checkpointing=False)
    need = loop.run_working_set(model, found, config, th.training_data(model, latents, positive), False)
    adapters = modules.adapter_memory(found, "tlora", 4)
    assert need.adapter_state == adapters["state_bytes"] and need.step_factors == adapters["step_factor_bytes"]
    assert need.activations > 0
    assert calls and calls[0] == need.total
