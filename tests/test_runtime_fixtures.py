"""The test harness itself: tiny models run, real-size inventories are right, prompts execute."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy


def test_tiny_models_sample_deterministically(comfy, family):
    first = comfy.sample(comfy.build_model(family, seed=0), family, steps=3, seed=5)
    again = comfy.sample(comfy.build_model(family, seed=0), family, steps=3, seed=5)
    other = comfy.sample(comfy.build_model(family, seed=1), family, steps=3, seed=5)
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_real_size_sdxl_has_the_560_attention_linears(comfy):
    model = comfy.build_model("sdxl", comfy.REAL_SDXL_CONFIG, device="meta")
    attn = {name: tuple(m.weight.shape) for name, m in model.diffusion_model.named_modules()
            if isinstance(m, torch.nn.Linear) and (".attn1." in name or ".attn2." in name)}
    assert len(attn) == 560
    assert attn["input_blocks.4.1.transformer_blocks.0.attn2.to_k"] == (640, 2048)
    assert attn["middle_block.1.transformer_blocks.9.attn1.to_out.0"] == (1280, 1280)
    assert attn["output_blocks.5.1.transformer_blocks.1.attn2.to_v"] == (640, 2048)


def test_real_size_flux_has_fused_qkv(comfy):
    model = comfy.build_model("flux", comfy.REAL_FLUX_CONFIG, device="meta")
    shapes = {name: tuple(m.weight.shape) for name, m in model.diffusion_model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    assert shapes["double_blocks.18.img_attn.qkv"] == (9216, 3072)
    assert shapes["double_blocks.0.txt_attn.proj"] == (3072, 3072)
    assert shapes["single_blocks.37.linear1"] == (3072 * 3 + 12288, 3072)
    assert "double_blocks.19.img_attn.qkv" not in shapes and "single_blocks.38.linear1" not in shapes


def test_real_size_configs_are_what_comfyui_detects(comfy, real_size):
    """The real-size configs, written out here, against this runtime's own checkpoint detection
    (comfy.model_detection) of the state dict they make: same model class, and the detected config
    builds the same model (newer ComfyUI's detection also spells out fields at their defaults)."""
    from comfy.model_detection import model_config_from_unet

    runtime = comfy   # the harness module (the fixture), not ComfyUI's package
    family, name = real_size
    config = runtime.real_config(family, name)
    state_dict = runtime.build_model(family, config, device="meta").diffusion_model.state_dict()
    detected = model_config_from_unet(state_dict, "")
    ours = runtime.family_model_config(family, config)
    assert type(detected) is type(ours)
    with torch.device("meta"):
        rebuilt = detected.get_model({}).diffusion_model
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in state_dict.items()}
    built = runtime.build_model(family, config, device="meta").diffusion_model
    if hasattr(built, "params"):   # BFL transformers keep their parameter dataclass
        assert rebuilt.params == built.params
    else:
        assert {k: v for k, v in detected.unet_config.items() if k != "num_head_channels"} == \
            {k: v for k, v in ours.unet_config.items() if k != "num_head_channels"}


def test_run_prompt_executes_a_real_graph(comfy):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 8, "batch_size": 2, "color": 255}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    executor, server = comfy.run_prompt(prompt)
    assert executor.success, server.messages
    images = executor.history_result["outputs"]["2"]["images"]
    assert len(images) == 2
    assert any(event == "executed" for event, _ in server.messages)


def test_real_size_models_deselected_here_do_not_load_here(comfy):
    """A real-size model whose tests this ComfyUI deselects (its tiny config's runtimes leave this
    version out: FLUX.2 Klein on 0.3.75) really fails this runtime's checkpoint detection, or its
    family's model class does not exist here at all (Krea 2, Anima on 0.3.75), so the
    deselection hides no model that works."""
    from comfy import supported_models
    from comfy.model_detection import model_config_from_unet

    import family_configs

    runtime = comfy
    version = runtime.comfyui_version()
    for family, name in family_configs.real_sizes():
        if version in family_configs.real_size_runtimes(family, name):
            continue
        if not family_configs.runs_here(family, version):
            assert not hasattr(supported_models, family_configs.TINY[family].supported_model)
            continue
        # The state dict of the real shapes, built from ComfyUI's classes with the config given.
        state_dict = runtime.build_model(family, runtime.real_config(family, name),
                                         device="meta").diffusion_model.state_dict()
        with pytest.raises((AssertionError, RuntimeError, ValueError)):
            detected = model_config_from_unet(state_dict, "")
            with torch.device("meta"):
                rebuilt = detected.get_model({}).diffusion_model
            # a model detected with other shapes does not load either
            assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
                {k: v.shape for k, v in state_dict.items()}


def test_dynamic_vram_stays_off_on_the_cpu(comfy):
    """enable_dynamic_vram() (what bootstrap(cpu=False) runs) leaves ComfyUI's legacy patcher on
    with --cpu, as ComfyUI's main.py does."""
    from comfy import model_patcher

    status = comfy.enable_dynamic_vram()
    if hasattr(model_patcher, "ModelPatcherDynamic"):   # ComfyUI 0.33+: --cpu disables it
        assert status == "off: disabled by ComfyUI's arguments"
        assert model_patcher.CoreModelPatcher is model_patcher.ModelPatcher
    else:
        assert status == "off: this ComfyUI has no dynamic VRAM"
