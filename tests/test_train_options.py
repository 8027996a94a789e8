"""T-LoRA Train's optimizer, learning-rate schedule and timestep-sampling choices: what each does,
that each is stored in the files, and that a split run resumes bit-for-bit like an unbroken one.

ComfyUI's ``loras`` folder is redirected to a temporary folder for every node test.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import train_helpers as th
from safetensors import safe_open

pytestmark = pytest.mark.comfy

NODE_DEFAULTS = dict(variant="auto", rank=4, min_rank=0, schedule_power=1.0, steps=4, learning_rate=1e-2,
                     batch_size=1, seed=0, target_layers="attention", training_dtype="auto",
                     gradient_checkpointing=True, save_every=0, file_name="t", resume_from="none")


@pytest.fixture(scope="module")
def mods(pack):
    from comfyui_tlora.training import loop, optim, state, timesteps

    return loop, optim, state, timesteps


def run_node(model, latents, positive, **overrides):
    from comfyui_tlora.nodes.train import TLoRATrain

    with torch.inference_mode():   # as ComfyUI runs nodes
        return TLoRATrain.execute(model, latents, positive, **{**NODE_DEFAULTS, **overrides}).args


def test_constant_rate_without_warmup_is_the_rate_itself(mods):
    _, optim, _, _ = mods
    assert [optim.lr_factor("constant", s, 10, 0) for s in range(10)] == [1.0] * 10


def test_warmup_is_linear_then_cosine_decays_towards_zero(mods):
    _, optim, _, _ = mods
    factors = [optim.lr_factor("cosine", s, 12, 4) for s in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and all(a > b for a, b in zip(factors[4:], factors[5:]))
    assert 0 < factors[-1] < 0.05
    assert math.isclose(factors[8], 0.5, rel_tol=1e-12)   # half-way through the decay
    assert [optim.lr_factor("constant", s, 12, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("choice, message", [
    (dict(optimizer="SGD"), "unknown optimizer"),
    (dict(lr_schedule="linear"), "unknown lr_schedule"),
    (dict(warmup_steps=-1), "warmup_steps must be 0"),
    (dict(warmup_steps=10), r"warmup_steps \(10\) must be below steps \(10\)"),
    (dict(optimizer="Prodigy", learning_rate=1e-4), "AdamW-sized rate"),
])
def test_bad_optimizer_choices_are_refused(mods, choice, message):
    _, optim, _, _ = mods
    args = {"optimizer": "AdamW", "lr_schedule": "constant", "warmup_steps": 0, "steps": 10,
            "learning_rate": 1.0, **choice}
    with pytest.raises(ValueError, match=message):
        optim.check_choices(**args)


def test_prodigy_without_its_package_says_to_install_it(mods, monkeypatch):
    _, optim, _, _ = mods
    monkeypatch.setitem(sys.modules, "prodigyopt", None)   # import prodigyopt -> ImportError
    with pytest.raises(ValueError, match="install it there"):
        optim.check_choices("Prodigy", "constant", 0, 10, 1.0)
    optim.check_choices("AdamW", "constant", 0, 10, 1e-4)   # AdamW needs nothing more


def test_prodigy_uses_the_reference_settings(mods):
    import prodigyopt

    _, optim, _, _ = mods
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = optim.make_optimizer(params, "Prodigy", 1.0, (0.5, 0.5), 0.0, torch.device("cpu"))
    group = opt.param_groups[0]
    assert isinstance(opt, prodigyopt.Prodigy)
    # The reference FLUX script's arguments, whatever AdamW's betas / weight decay are.
    assert (group["lr"], tuple(group["betas"]), group["beta3"], group["weight_decay"], group["eps"]) == \
        (1.0, (0.9, 0.999), None, 1e-4, 1e-8)
    assert group["decouple"] and group["use_bias_correction"] and group["safeguard_warmup"]
    adamw = optim.make_optimizer(params, "AdamW", 1e-4, (0.9, 0.999), 1e-4, torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["eps"] == 1e-8


@pytest.mark.parametrize("optimizer", ["AdamW", "Prodigy"])
def test_memory_asked_for_counts_each_optimizers_state(mods, optimizer):
    from comfyui_tlora.training import modules, targets

    _, optim, _, _ = mods
    found = [targets.TrainTarget("a", None, 24, 20), targets.TrainTarget("b", None, 16, 12)]
    adapters = modules.AdapterSet(found, "vanilla", 6, seed=0)
    with torch.no_grad():   # Prodigy keeps only a scalar p0 for an all-zero factor: count the full case
        for p in adapters.parameters():
            p.add_(0.5)
    made = optim.make_optimizer(adapters.parameters(), optimizer, 1.0, (0.9, 0.999), 1e-4,
                                torch.device("cpu"))
    for p in adapters.parameters():
        p.grad = torch.ones_like(p)
    made.step()
    state = sum(t.numel() * t.element_size() for s in made.state.values() for t in s.values()
                if torch.is_tensor(t) and t.ndim > 0)
    params = sum(p.numel() * p.element_size() for p in adapters.parameters())
    need = modules.adapter_memory(found, "vanilla", 6, optim.STATE_COPIES[optimizer])
    assert need["state_bytes"] == 2 * params + state   # parameters, gradients, optimizer state


def test_uniform_sampling_is_the_reference_draw(comfy, mods):
    _, _, _, timesteps = mods
    ms = comfy.build_model("flux").model.model_sampling
    drawn = timesteps.draw_flow_sigmas(ms, 16, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.rand(16, generator=torch.Generator().manual_seed(3), dtype=torch.float64))


def test_logit_normal_sampling_has_the_asked_mean_and_spread(comfy, mods):
    _, _, _, timesteps = mods
    ms = comfy.build_model("flux").model.model_sampling
    sigma = timesteps.draw_flow_sigmas(ms, 20000, torch.Generator().manual_seed(0), "logit-normal", 0.5, 0.7)
    logit = torch.log(sigma / (1 - sigma))
    # 20000 draws: the sample mean's standard error is 0.7 / sqrt(20000) = 0.005.
    assert abs(float(logit.mean()) - 0.5) < 0.03 and abs(float(logit.std()) - 0.7) < 0.03
    assert 0 < float(sigma.min()) and float(sigma.max()) < 1


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_shifted_sampling_is_the_models_own_schedule_shift(comfy, mods, family):
    _, _, _, timesteps = mods
    ms = comfy.build_model(family).model.model_sampling
    if family == "sd3":
        ms.set_parameters(shift=3.0)   # SD3's shift (the tiny config may carry another)
    u = torch.rand(32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shifted = timesteps.draw_flow_sigmas(ms, 32, torch.Generator().manual_seed(1), "uniform shifted")
    # The model's sampler gives the fraction u of its schedule the noise level percent_to_sigma(1 - u).
    expected = torch.tensor([float(ms.percent_to_sigma(1.0 - float(x))) for x in u], dtype=torch.float64)
    torch.testing.assert_close(shifted, expected, rtol=1e-6, atol=1e-9)
    assert float((shifted - u).min()) > 0   # the shift moves every level up (more noise)


def test_discrete_families_accept_only_uniform_sampling(mods):
    _, _, _, timesteps = mods
    timesteps.check_sampling("discrete", "uniform")
    with pytest.raises(ValueError, match="set timestep_sampling to uniform"):
        timesteps.check_sampling("discrete", "logit-normal", label="SDXL")
    with pytest.raises(ValueError, match="logit_std must be a positive"):
        timesteps.check_sampling("flow", "logit-normal", 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown timestep_sampling"):
        timesteps.check_sampling("flow", "cosmap")


def test_state_without_options_is_an_adamw_constant_uniform_run(mods, tmp_path):
    loop, optim, state, _ = mods
    old = state.TrainingState(2, [1.0, 0.5], {}, [], {}, {})
    state.save_state(tmp_path / "x.tlora-state", old)
    loaded = state.load_state(tmp_path / "x.tlora-state")
    assert loaded.options == optim.DEFAULT_OPTIONS == loop.TrainConfig().resume_options()
    assert loaded.optimizer_groups == []


def test_resuming_with_other_choices_names_the_metadata_key(mods):
    loop, _, state, _ = mods
    made = loop.TrainConfig(optimizer="Prodigy", lr_schedule="cosine", warmup_steps=2, steps=10,
                            timestep_sampling="logit-normal", logit_mean=0.5)
    saved = state.TrainingState(4, [], {}, [], {}, {}, made.resume_options())

    def check(**changes):
        ours = loop.TrainConfig(**{**made.__dict__, **changes}).resume_options()
        state.check_compatible(saved, {}, [], 10, ours)

    check()
    check(learning_rate=0.5)   # the rate may change on resume, as before
    for changes, message in [
            (dict(optimizer="AdamW"), "optimizer = 'Prodigy' .*tlora_state.options.* 'AdamW'"),
            (dict(lr_schedule="constant"), "lr_schedule = 'cosine'"),
            (dict(warmup_steps=0), "warmup_steps = 2"),
            (dict(timestep_sampling="uniform"), "timestep_sampling = 'logit-normal'"),
            (dict(logit_mean=0.0), "logit_mean = 0.5"),
            (dict(steps=20), "runs over 10 steps .*schedule_steps.*set steps to 10")]:
        with pytest.raises(ValueError, match=message):
            check(**changes)


def test_a_finished_or_shortened_cosine_run_is_told_what_resumes_it(mods):
    loop, _, state, _ = mods
    made = loop.TrainConfig(lr_schedule="cosine", steps=10).resume_options()
    for step, steps, message in [(10, 10, "end of its cosine .* cannot be extended"),
                                 (10, 20, "end of its cosine .* cannot be extended"),
                                 (4, 3, "already at step 4; set steps to 10")]:
        with pytest.raises(ValueError, match=message):
            state.check_compatible(state.TrainingState(step, [], {}, [], {}, {}, made), {}, [], steps,
                                   loop.TrainConfig(lr_schedule="cosine", steps=steps).resume_options())
    constant = state.TrainingState(4, [], {}, [], {}, {}, loop.TrainConfig().resume_options())
    with pytest.raises(ValueError, match="already at step 4; set steps above 4"):
        state.check_compatible(constant, {}, [], 3, loop.TrainConfig(steps=3).resume_options())


SPLIT_CASES = {
    "flux Prodigy cosine logit-normal shifted": (
        "flux", dict(optimizer="Prodigy", learning_rate=1.0, lr_schedule="cosine", warmup_steps=1,
                     timestep_sampling="logit-normal shifted", logit_mean=0.3, logit_std=0.8)),
    "flux AdamW constant warm-up uniform shifted": (
        "flux", dict(warmup_steps=3, timestep_sampling="uniform shifted")),
    "sdxl Prodigy cosine": ("sdxl", dict(optimizer="Prodigy", learning_rate=1.0, lr_schedule="cosine")),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_a_split_run_resumes_bit_for_bit_with_every_choice(case, loras_dir):
    from comfyui_tlora.training.state import load_state

    family, choices = SPLIT_CASES[case]
    model, latents, positive = th.node_inputs(family)
    run_node(model, latents, positive, save_every=2, file_name="a", **choices)
    run_node(model, latents, positive, file_name="b", resume_from="a_step00002.safetensors", **choices)
    run_node(model, latents, positive, file_name="plain")   # today's defaults
    with safe_open(str(loras_dir / "a.safetensors"), framework="pt") as fa, \
            safe_open(str(loras_dir / "b.safetensors"), framework="pt") as fb, \
            safe_open(str(loras_dir / "plain.safetensors"), framework="pt") as fp:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key
        # The choices change the training (otherwise the equality above proves nothing about them).
        assert any(not torch.equal(fa.get_tensor(k), fp.get_tensor(k)) for k in fa.keys())
        settings = json.loads(fa.metadata()["tlora.training"])
    for key, value in choices.items():
        assert settings[key] == value, key
    full, resumed = load_state(loras_dir / "a.tlora-state"), load_state(loras_dir / "b.tlora-state")
    assert resumed.step == full.step == 4 and resumed.losses == full.losses
    assert sorted(full.optimizer_tensors) == sorted(resumed.optimizer_tensors)
    for key, tensor in full.optimizer_tensors.items():
        assert torch.equal(tensor, resumed.optimizer_tensors[key]), key
    assert resumed.options == full.options and resumed.optimizer_groups == full.optimizer_groups
    assert full.options["optimizer"] == choices.get("optimizer", "AdamW")
    if choices.get("optimizer") == "Prodigy":
        assert any(name.endswith("/p0") for name in full.optimizer_tensors)   # Prodigy's own state
        group = full.optimizer_groups[0]   # the step-size estimate's running sums, restored too
        assert group["k"] == 4 and group["d_denom"] > 0 and group["d_numerator"] != 0


def test_resuming_a_prodigy_checkpoint_with_adamw_is_refused(loras_dir):
    model, latents, positive = th.node_inputs("flux")
    choices = dict(optimizer="Prodigy", learning_rate=1.0, lr_schedule="cosine")
    run_node(model, latents, positive, save_every=2, file_name="a", **choices)
    with pytest.raises(ValueError, match="optimizer = 'Prodigy'.*tlora_state.options"):
        run_node(model, latents, positive, file_name="b", resume_from="a_step00002.safetensors",
                 **{**choices, "optimizer": "AdamW", "learning_rate": 1e-2})
    with pytest.raises(ValueError, match="set steps to 4"):
        run_node(model, latents, positive, steps=6, file_name="b", resume_from="a_step00002.safetensors",
                 **choices)


@pytest.mark.parametrize("family, choice, message", [
    ("sdxl", dict(timestep_sampling="logit-normal"), "for flow models"),
    ("flux", dict(optimizer="Prodigy"), "AdamW-sized rate"),   # the node's default rate 1e-2 here
    ("flux", dict(warmup_steps=4), "must be below steps"),
])
def test_bad_choices_fail_before_any_gpu_work(family, choice, message, loras_dir, monkeypatch):
    import comfy.model_management

    def no_gpu_work(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    model, latents, positive = th.node_inputs(family)
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", no_gpu_work)
    with pytest.raises(ValueError, match=message):
        run_node(model, latents, positive, **choice)
    assert list(loras_dir.rglob("*")) == []
