"""Validation samples of T-LoRA Train in the real runtime: the training result is unchanged, the
image is what the Loader + KSampler make of the checkpoint, files and outputs, isolation, Cancel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import train_helpers as th
from PIL import Image
from safetensors.torch import load_file
from test_train_node import _graph, files_in, run_node_outputs

import comfy_runtime

pytestmark = pytest.mark.comfy

FAMILIES = ("sdxl", "flux")   # the Cancel test's two kinds of model (UNet, DiT)
VALIDATION = dict(validation_every=2, validation_steps=2, validation_cfg=1.0, validation_seed=3)


def _validation(positive, **overrides):
    return {**VALIDATION, "validation_positive": positive, **overrides}


@pytest.fixture
def watch_install(monkeypatch):
    """Records, at every model call of a validation sample, whether autograd was on, and lets a
    test act there (``on_call``); the sampling still goes through the Loader's install."""
    import comfy.patcher_extension
    from comfyui_tlora.nodes import train as train_node

    calls, holders, actions = [], [], []
    real_install = train_node.install

    def record(executor, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        for action in actions:
            action()
        return executor(*args, **kwargs)

    def install(patcher, weights, strength):
        holders.append(real_install(patcher, weights, strength))
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_watch", record)
        return holders[-1]

    monkeypatch.setattr(train_node, "install", install)
    return calls, holders, actions


def test_same_adapter_with_and_without_validation(family, loras_dir, watch_install):
    calls, holders, _ = watch_install
    model, latents, positive = th.node_inputs(family)
    torch.manual_seed(11)
    run_node_outputs(model, latents, positive, steps=5, file_name="plain")
    rng_plain = torch.get_rng_state()
    torch.manual_seed(11)
    run_node_outputs(model, latents, positive, steps=5, file_name="val", **_validation(positive))
    assert torch.equal(torch.get_rng_state(), rng_plain)   # the global RNG is left as training leaves it
    plain, val = load_file(loras_dir / "plain.safetensors"), load_file(loras_dir / "val.safetensors")
    assert plain.keys() == val.keys() and all(torch.equal(plain[k], val[k]) for k in plain)
    # Steps 2, 4 and the last (5), each sampled through the Loader's holder (2 sampler steps),
    # without autograd; the first and last holders are the output MODELs' (never sampled here).
    assert [h.calls for h in holders] == [0, 2, 2, 2, 0]
    assert calls and not any(calls)


def test_validation_image_is_the_loaders_sample_of_the_checkpoint(family, loras_dir, comfy, comfy_nodes):
    from comfyui_tlora.training import validation

    model, latents, positive = th.node_inputs(family)
    before = th.snapshot(model)
    out = run_node_outputs(model, latents, positive, steps=4, save_every=2, file_name="v",
                           **_validation(positive))
    th.assert_restored(before, model)
    assert not model.attachments and not model.injections
    assert files_in(loras_dir) == ["v.safetensors", "v.tlora-state", "v_step00002.png",
                                   "v_step00002.safetensors", "v_step00002.tlora-state", "v_step00004.png"]
    loader = comfy_nodes.NODE_CLASS_MAPPINGS["TLoRALoader"]
    tiles = []
    for step, name in ((2, "v_step00002.safetensors"), (4, "v.safetensors")):
        with torch.inference_mode():
            loaded = loader.execute(model, name, 1.0, -1, 0.0, False).args[0]
            expected = _samplers_own_preview(loaded, family, positive)
        written = np.asarray(Image.open(loras_dir / f"v_step{step:05d}.png")).astype(int)
        # The sampler's last x0 and the sampled latent taken back to the model's space differ by
        # float rounding (x - (x - x0), a scale and shift undone): at most one level in a pixel.
        assert np.abs(written - expected).max() <= 1
        tiles.append(written)
    grid = out.args[3]
    h, w = tiles[0].shape[:2]
    assert grid.shape == (1, h + validation.TILE_LABEL, 2 * w, 3)
    got = (grid[0].numpy() * 255).round().astype(int)
    assert np.array_equal(got[validation.TILE_LABEL:, :w], tiles[0])
    assert np.array_equal(got[validation.TILE_LABEL:, w:], tiles[1])
    assert out.ui is not None and len(out.ui.as_dict()["images"]) == 1


def _samplers_own_preview(loaded, family: str, positive) -> np.ndarray:
    """What ComfyUI's sampler shows as its latent2rgb preview of the last step (its callback's x0,
    in the model's space) when the validation sample's sampling runs outside the trainer."""
    import comfy.sample
    import latent_preview

    shape = comfy_runtime.latent_shape(family, 1, th.SIZE)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(VALIDATION["validation_seed"]))
    seen = {}
    comfy.sample.sample(loaded, noise, VALIDATION["validation_steps"], 1.0, "euler", "normal", positive,
                        positive, torch.zeros(shape), seed=VALIDATION["validation_seed"], disable_pbar=True,
                        callback=lambda step, x0, x, total: seen.update(x0=x0))
    fmt = loaded.model.latent_format
    previewer = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors,
                                                   getattr(fmt, "latent_rgb_factors_bias", None),
                                                   getattr(fmt, "latent_rgb_factors_reshape", None))
    return np.asarray(previewer.decode_latent_to_preview(seen["x0"].float()).convert("RGB")).astype(int)


@pytest.mark.parametrize("negative, batch", [(False, 1), (True, 2)])
def test_without_a_negative_prompt_cfg_is_skipped(negative, batch, loras_dir, monkeypatch):
    import comfy.patcher_extension
    from comfyui_tlora.nodes import train as train_node

    batches, real_install = [], train_node.install

    def install(patcher, weights, strength):
        holder = real_install(patcher, weights, strength)
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_batch",
                                     lambda executor, *a, **k: (batches.append(a[0].shape[0]), executor(*a, **k))[1])
        return holder

    monkeypatch.setattr(train_node, "install", install)
    model, latents, positive = th.node_inputs("sdxl")
    extra = {"validation_negative": positive} if negative else {}
    run_node_outputs(model, latents, positive, steps=2, **_validation(positive, validation_cfg=5.0, **extra))
    # One validation sample (the last step) of two sampler steps: cond and uncond batched together
    # only when a negative prompt makes CFG mean something.
    assert batches == [batch] * VALIDATION["validation_steps"]


@pytest.mark.parametrize("error", ["cancel", "failure"])
def test_the_last_sample_failing_loses_nothing_of_the_run(error, loras_dir, watch_install):
    import comfy.model_management as mm

    _, holders, actions = watch_install

    def fail_in_the_last_sample():
        if len(holders) == 2:   # the second validation sample: after the last step
            if error == "cancel":
                mm.interrupt_current_processing(True)
            else:
                raise RuntimeError("out of memory while sampling")

    actions.append(fail_in_the_last_sample)
    model, latents, positive = th.node_inputs("flux")
    torch.manual_seed(11)
    with pytest.raises(mm.InterruptProcessingException if error == "cancel" else RuntimeError):
        run_node_outputs(model, latents, positive, steps=4, file_name="v", **_validation(positive))
    assert not mm.processing_interrupted()
    assert files_in(loras_dir) == ["v.safetensors", "v.tlora-state", "v_step00002.png"]
    actions.clear()
    torch.manual_seed(11)
    run_node_outputs(model, latents, positive, steps=4, file_name="plain")
    finished, plain = load_file(loras_dir / "v.safetensors"), load_file(loras_dir / "plain.safetensors")
    assert finished.keys() == plain.keys() and all(torch.equal(finished[k], plain[k]) for k in plain)


def test_a_vae_of_another_latent_space_is_refused_before_training(loras_dir, watch_install):
    import tiny_nodes

    _, holders, _ = watch_install
    model, latents, positive = th.node_inputs("flux")
    with torch.inference_mode():
        vae = tiny_nodes.build_tiny_vae("sdxl")
    with pytest.raises(ValueError, match="validation_vae makes 4-channel latents, but this FLUX"):
        run_node_outputs(model, latents, positive, steps=2, **_validation(positive, validation_vae=vae))
    assert files_in(loras_dir) == [] and not holders


def test_validation_off_keeps_the_run_and_outputs_a_placeholder(loras_dir, watch_install):
    _, holders, _ = watch_install
    model, latents, positive = th.node_inputs("flux")
    out = run_node_outputs(model, latents, positive, steps=2, validation_positive=positive)
    assert len(out.args) == 4 and out.args[3].shape[0] == 1 and out.ui is None
    assert [h.calls for h in holders] == [0]   # only the output MODEL's, never sampled
    assert files_in(loras_dir) == ["tlora/t.safetensors", "tlora/t.tlora-state"]


# SDXL: 8x; FLUX.2: 16x (128 channels); Qwen-Image: 5-D latents, a Wan VAE's (frames, H, W) images.
@pytest.mark.parametrize("family, width, height", [("sdxl", 48, 32), ("flux2", 64, 32), ("qwen_image", 48, 32)])
def test_vae_decodes_the_validation_samples_at_the_asked_pixel_size(family, width, height, loras_dir):
    import tiny_nodes

    model, latents, positive = th.node_inputs(family)
    with torch.inference_mode():
        vae = tiny_nodes.build_tiny_vae(family)
    out = run_node_outputs(model, latents, positive, steps=2, file_name="d",
                           **_validation(positive, validation_vae=vae, validation_width=width,
                                         validation_height=height))
    assert Image.open(loras_dir / "d_step00002.png").size == (width, height)   # decoded: full pixel size
    assert out.args[3].shape[1:] == (height + 14, width, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_cancel_during_a_validation_sample_stops_cleanly(family, loras_dir, watch_install):
    import comfy.model_management as mm

    calls, _, actions = watch_install
    actions.append(lambda: mm.interrupt_current_processing(True))
    model, latents, positive = th.node_inputs(family)
    before = th.snapshot(model)
    with pytest.raises(mm.InterruptProcessingException):
        run_node_outputs(model, latents, positive, steps=50, save_every=0, **_validation(positive))
    assert len(calls) == 1   # stopped at the first sampler step of the first validation sample
    th.assert_restored(before, model)
    assert not model.attachments and not model.injections
    assert not mm.processing_interrupted()
    assert files_in(loras_dir) == []


@pytest.mark.parametrize("bad, message", [
    (dict(validation_positive=None), "validation_positive is not connected"),
    (dict(validation_sampler="nope"), "unknown validation_sampler"),
    (dict(validation_width=4), "smaller than one latent pixel"),
])
def test_bad_validation_inputs_fail_before_training(bad, message, loras_dir, watch_install):
    _, holders, _ = watch_install
    model, latents, positive = th.node_inputs("sdxl")
    with pytest.raises(ValueError, match=message):
        run_node_outputs(model, latents, positive, steps=2, **{**_validation(positive), **bad})
    assert files_in(loras_dir) == [] and not holders


def test_validation_in_the_real_prompt_executor(loras_dir, comfy):
    graph = _graph("sdxl", steps=4)
    graph["5"]["inputs"].update(VALIDATION, validation_positive=["2", 0], validation_vae=["1", 2],
                                file_name="exec")
    graph["11"] = {"class_type": "PreviewImage", "inputs": {"images": ["5", 3]}}
    executor, server = comfy.run_prompt(graph)
    assert executor.success, [m for m in server.messages if m[0] == "execution_error"]
    assert {"exec_step00002.png", "exec_step00004.png"} <= set(files_in(loras_dir))
    outputs = executor.history_result["outputs"]
    assert len(outputs["5"]["images"]) == 1 and len(outputs["11"]["images"]) == 1
    grid = comfy_runtime.node_output(executor, "5", 3)
    assert grid.shape[2] == 2 * 64   # two 64x64 decoded tiles side by side
