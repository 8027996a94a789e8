"""The T-LoRA Train node: files, Loader equivalence, resume, bad inputs, progress, Cancel, PromptExecutor.

ComfyUI's ``loras`` folder is redirected to a temporary folder for every test and restored after.
"""

from __future__ import annotations

import json

import pytest
import torch
import train_helpers as th
from safetensors import safe_open

import comfy_runtime
import family_configs

pytestmark = pytest.mark.comfy

VARIANT = {"sdxl": "tlora", "flux": "vanilla"}   # what variant "auto" picks per family
DEFAULTS = dict(variant="auto", rank=4, min_rank=0, schedule_power=1.0, steps=3, learning_rate=1e-2,
                batch_size=1, seed=0, target_layers="attention", training_dtype="auto",
                gradient_checkpointing=True, save_every=0, file_name="tlora/t", resume_from="none")


def run_node(model, latents, positive, mask=None, **overrides):
    """(model, file_name, loss_curve): the node's first three outputs (validation: its own tests)."""
    return run_node_outputs(model, latents, positive, mask, **overrides).args[:3]


def run_node_outputs(model, latents, positive, mask=None, **overrides):
    """The node's whole NodeOutput."""
    from comfyui_tlora.nodes.train import TLoRATrain

    with torch.inference_mode():   # as ComfyUI runs nodes
        return TLoRATrain.execute(model, latents, positive, mask=mask, **{**DEFAULTS, **overrides})


def files_in(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_node_saves_the_file_and_its_model_equals_the_loaders(family, loras_dir, comfy, comfy_nodes):
    model, latents, positive = th.node_inputs(family)
    before = th.snapshot(model)
    out_model, name, curve = run_node(model, latents, positive)
    th.assert_restored(before, model)
    assert name == "tlora/t.safetensors"
    assert files_in(loras_dir) == ["tlora/t.safetensors", "tlora/t.tlora-state"]   # no temp files
    with safe_open(str(loras_dir / name), framework="pt") as f:
        meta = f.metadata()
    assert meta["tlora.variant"] == VARIANT.get(family, comfy_runtime.family_spec(family).recipe.variant) and meta["tlora.rank"] == "4"
    labels = comfy_runtime.family_spec(family).file_labels   # labelled as its own family
    assert meta["tlora.architecture"] == family_configs.registry_id(family) and {k: meta[k] for k in labels} == dict(labels)
    assert meta["tlora.min_rank"] == "2"   # min_rank 0 = half the rank
    settings = json.loads(meta["tlora.training"])
    assert settings["steps"] == 3 and settings["learning_rate"] == 1e-2 and settings["seed"] == 0
    assert settings["optimizer"] == "AdamW" and settings["images"] == 1 and settings["architecture"] == family_configs.registry_id(family)
    assert curve.shape == (1, 320, 512, 3) and 0 <= float(curve.min()) and float(curve.max()) <= 1
    loader = comfy_nodes.NODE_CLASS_MAPPINGS["TLoRALoader"]
    with torch.inference_mode():
        loaded = loader.execute(model, name, 1.0, -1, 0.0, False).args[0]
        trained_out = comfy.sample(out_model, family, steps=2, size=8, seed=1)
        loader_out = comfy.sample(loaded, family, steps=2, size=8, seed=1)
        base_out = comfy.sample(model, family, steps=2, size=8, seed=1)
    assert torch.equal(trained_out, loader_out)
    assert not torch.equal(trained_out, base_out)


def test_an_existing_file_is_never_overwritten(loras_dir):
    model, latents, positive = th.node_inputs("flux")
    _, first, _ = run_node(model, latents, positive, steps=1)
    data = (loras_dir / first).read_bytes()
    _, second, _ = run_node(model, latents, positive, steps=1, seed=1)
    assert (first, second) == ("tlora/t.safetensors", "tlora/t_00001.safetensors")
    assert (loras_dir / first).read_bytes() == data


def test_save_every_checkpoints_resume_exactly_like_an_uninterrupted_run(loras_dir):
    from comfyui_tlora.training import lora_folder
    from comfyui_tlora.training.state import load_state

    model, latents, positive = th.node_inputs("flux")
    run_node(model, latents, positive, steps=4, save_every=2, file_name="a")
    assert files_in(loras_dir) == ["a.safetensors", "a.tlora-state", "a_step00002.safetensors",
                               "a_step00002.tlora-state"]
    assert "a_step00002.safetensors" in lora_folder.resumable_files()
    assert load_state(loras_dir / "a_step00002.tlora-state").step == 2
    run_node(model, latents, positive, steps=4, file_name="b", resume_from="a_step00002.safetensors")
    with safe_open(str(loras_dir / "a.safetensors"), framework="pt") as fa, \
            safe_open(str(loras_dir / "b.safetensors"), framework="pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key
    full, resumed = load_state(loras_dir / "a.tlora-state"), load_state(loras_dir / "b.tlora-state")
    assert resumed.step == full.step == 4 and resumed.losses == full.losses
    for key, tensor in full.optimizer_tensors.items():
        assert torch.equal(tensor, resumed.optimizer_tensors[key]), key
    with pytest.raises(ValueError, match="rank = 4, this run has 8"):
        run_node(model, latents, positive, steps=6, rank=8, file_name="c",
                 resume_from="a_step00002.safetensors")


def test_resuming_with_another_seed_or_batch_size_is_warned_about(loras_dir, caplog):
    import logging

    from comfyui_tlora.training.state import load_state

    model, latents, positive = th.node_inputs("sdxl", images=2)
    run_node(model, latents, positive, steps=2, file_name="a", seed=3)
    assert load_state(loras_dir / "a.tlora-state").draws == {"seed": 3, "batch_size": 1}
    with caplog.at_level(logging.WARNING):
        run_node(model, latents, positive, steps=3, file_name="same", seed=3, resume_from="a.safetensors")
    assert "tlora_state.draws" not in caplog.text
    with caplog.at_level(logging.WARNING):
        run_node(model, latents, positive, steps=3, file_name="other", seed=4, batch_size=2,
                 resume_from="a.safetensors")
    warned = [r.getMessage() for r in caplog.records if "tlora_state.draws" in r.getMessage()]
    assert len(warned) == 2 and "a.safetensors" in warned[0]
    assert "batch_size = 2" in warned[0] and "seed = 4" in warned[1] and "has 3" in warned[1]


def _bad_cases():
    def latents_of(channels):
        return lambda f, lat, pos: ({"samples": torch.zeros(1, channels, 8, 8)}, pos, None, {})

    return {
        "latent from another family": ("sdxl", latents_of(16), "16 channels"),
        # Qwen-Image's VAE gives 5-D latents; a 4-D one (an SD3-style latent) is refused.
        "4-D latent for a 5-D family": ("qwen_image", lambda f, lat, pos: (
            {"samples": lat["samples"][:, :, 0]}, pos, None, {}), "expects \\(images, channels, frames"),
        "mask of the wrong size on a 5-D latent": ("qwen_image", lambda f, lat, pos: (
            lat, pos, torch.ones(1, 50, 64), {}), "the mask is 64x50"),
        "latent with NaN": ("sdxl", lambda f, lat, pos: (
            {"samples": torch.full((1, 4, 8, 8), float("nan"))}, pos, None, {}), "NaN"),
        "empty conditioning": ("flux", lambda f, lat, pos: (lat, [], None, {}), "CONDITIONING is empty"),
        "conditioning without tokens": ("flux", lambda f, lat, pos: (
            lat, [[torch.zeros(1, 0, 32), pos[0][1]]], None, {}), "no text tokens"),
        "conditioning of another width": ("sdxl", lambda f, lat, pos: (
            lat, [[torch.zeros(1, 77, 768), pos[0][1]]], None, {}), "width 768"),
        "rank wider than the layers": ("sdxl", lambda f, lat, pos: (lat, pos, None, {"rank": 64}),
                                       "larger than the narrowest"),
        "min_rank above rank": ("flux", lambda f, lat, pos: (lat, pos, None, {"min_rank": 5}),
                                "min_rank must be in"),
        "zero steps": ("flux", lambda f, lat, pos: (lat, pos, None, {"steps": 0}), "steps must be at least 1"),
        "mask of the wrong size": ("flux", lambda f, lat, pos: (lat, pos, torch.ones(1, 50, 64), {}),
                                   "the mask is 64x50"),
        "file outside the loras folder": ("flux", lambda f, lat, pos: (lat, pos, None, {"file_name": "../x"}),
                                          "relative name"),
        "resume from a missing file": ("flux", lambda f, lat, pos: (lat, pos, None, {"resume_from": "nope"}),
                                       "no LoRA named"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_inputs_fail_clearly_before_any_gpu_work(case, loras_dir, monkeypatch):
    import comfy.model_management

    family, make, message = _bad_cases()[case]
    model, latents, positive = th.node_inputs(family)
    with torch.inference_mode():
        latents, positive, mask, overrides = make(family, latents, positive)

    def no_gpu_work(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", no_gpu_work)
    with pytest.raises(ValueError, match=message):
        run_node(model, latents, positive, mask=mask, **overrides)
    assert files_in(loras_dir) == []


def test_progress_bar_reports_every_step_with_a_loss_curve_preview(loras_dir, monkeypatch):
    import comfy.utils

    calls = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: calls.append((value, total, preview)))
    model, latents, positive = th.node_inputs("flux")
    run_node(model, latents, positive, steps=10)
    assert [(v, t) for v, t, _ in calls] == [(i, 10) for i in range(1, 11)]
    previews = [p for _, _, p in calls if p is not None]
    assert len(previews) == 1 and previews[0][0] == "JPEG" and previews[0][1].size == (512, 320)


# 4-D and 5-D latents; FLUX.2's VAE scales 16x, so its image-size mask is twice as large.
@pytest.mark.parametrize("family", ["sdxl", "qwen_image", "flux2"])
def test_few_images_with_per_image_prompts_and_a_subject_mask(loras_dir, family):
    model, latents, positive = th.node_inputs(family, images=2)
    side = th.SIZE * comfy_runtime.family_spec(family).latent_downscale
    with torch.inference_mode():
        second = th.node_inputs(family)[2]
        positive = positive + second   # one prompt per image, in image order
        mask = torch.zeros(2, side, side)
        mask[:, side // 4:3 * side // 4, side // 4:3 * side // 4] = 1
    _, name, _ = run_node(model, latents, positive, mask=mask, batch_size=2, steps=2)
    with safe_open(str(loras_dir / name), framework="pt") as f:
        assert json.loads(f.metadata()["tlora.training"])["images"] == 2


def _graph(family: str, steps: int) -> dict:
    spec = comfy_runtime.family_spec(family)
    # A one-frame video latent (B, 16, 1, h, w) for the 5-D families.
    empty_latent = "EmptyHunyuanLatentVideo" if spec.latent_ndim == 5 else \
        "EmptyLatentImage" if spec.latent_channels == 4 else "EmptySD3LatentImage"
    frames = {"length": 1} if spec.latent_ndim == 5 else {}
    return {
        "1": {"class_type": "TLoRATestTinyCheckpointLoader", "inputs": {"family": family}},
        "2": {"class_type": "TLoRATestTinyTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of sks dog"}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "TLoRATrain", "inputs": {
            "model": ["1", 0], "latents": ["4", 0], "positive": ["2", 0],
            **{**DEFAULTS, "steps": steps, "file_name": f"graph_{family}"}}},
        "6": {"class_type": empty_latent, "inputs": {"width": 64, "height": 64, "batch_size": 1, **frames}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0], "seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["6", 0],
            "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["5", 2]}},
    }


def _register_tiny_nodes():
    import tiny_nodes

    tiny_nodes.register()


def test_runs_in_the_real_prompt_executor(family, loras_dir, comfy):
    _register_tiny_nodes()
    executor, server = comfy.run_prompt(_graph(family, steps=2))
    assert executor.success, [m for m in server.messages if m[0] == "execution_error"]
    assert files_in(loras_dir) == [f"graph_{family}.safetensors", f"graph_{family}.tlora-state"]
    outputs = executor.history_result["outputs"]
    assert len(outputs["9"]["images"]) == 1 and len(outputs["10"]["images"]) == 1


def test_comfyui_rejects_zero_steps_before_running(loras_dir, comfy):
    _register_tiny_nodes()
    graph = _graph("flux", steps=0)
    with pytest.raises(AssertionError, match="steps"):
        comfy.run_prompt(graph)
    assert files_in(loras_dir) == []


def test_cancel_in_the_prompt_executor_leaves_no_file(loras_dir, comfy, monkeypatch):
    import comfy.model_management as mm
    from comfy import utils as comfy_utils

    _register_tiny_nodes()
    steps_seen = []

    def press_cancel_at_step_two(value, total, preview, node_id=None):
        steps_seen.append(value)
        if value == 2:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(comfy_utils, "PROGRESS_BAR_HOOK", press_cancel_at_step_two)
    graph = _graph("sdxl", steps=50)
    graph["5"]["inputs"]["save_every"] = 0
    executor, server = comfy.run_prompt(graph)
    assert not executor.success
    assert any(event == "execution_interrupted" for event, _ in server.messages)
    assert steps_seen == [1, 2]
    assert not mm.processing_interrupted()
    assert files_in(loras_dir) == []


def test_cancel_of_the_node_leaves_no_file_and_no_patch(loras_dir, monkeypatch):
    import comfy.model_management as mm
    from comfy import utils as comfy_utils

    def press_cancel_at_step_three(value, total, preview, node_id=None):
        if value == 3:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(comfy_utils, "PROGRESS_BAR_HOOK", press_cancel_at_step_three)
    model, latents, positive = th.node_inputs("flux")
    before = th.snapshot(model)
    with pytest.raises(mm.InterruptProcessingException):
        run_node(model, latents, positive, steps=50)
    th.assert_restored(before, model)
    assert not model.attachments and not model.injections   # the input MODEL got no T-LoRA
    assert not mm.processing_interrupted()
    assert files_in(loras_dir) == []


@pytest.mark.parametrize("variant, file_variant", [("T-LoRA", "tlora"), ("Vanilla T-LoRA", "vanilla"),
                                                   ("Ortho-LoRA", "ortho"), ("LoRA", "lora")])
def test_every_variant_round_trips_through_the_loader(variant, file_variant, loras_dir, comfy, comfy_nodes):
    model, latents, positive = th.node_inputs("flux")
    out_model, name, _ = run_node(model, latents, positive, variant=variant, steps=2)
    with safe_open(str(loras_dir / name), framework="pt") as f:
        meta = f.metadata()
    assert meta["tlora.variant"] == file_variant
    assert ("tlora.min_rank" in meta) == (file_variant in ("tlora", "vanilla"))
    loader = comfy_nodes.NODE_CLASS_MAPPINGS["TLoRALoader"]
    with torch.inference_mode():
        loaded = loader.execute(model, name, 1.0, -1, 0.0, False).args[0]
        assert torch.equal(comfy.sample(out_model, "flux", steps=2, size=8, seed=2),
                           comfy.sample(loaded, "flux", steps=2, size=8, seed=2))
