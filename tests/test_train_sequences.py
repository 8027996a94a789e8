"""T-LoRA Train among other nodes, in ComfyUI's real prompt executor, on every kind of base.

One prompt per sequence, its order forced by data (each later sampler starts from the earlier
one's latent): a T-LoRA Loader or a stock LoRA before T-LoRA Train; after the run, the base MODEL
is sampled, a stock LoRA is applied to it and it trains a second time. The base's weights must stay
the same tensors (inference tensors, as ComfyUI's loader made them) with the same values, and the
base sampled after training must equal the base sampled in a fresh process-state.
"""

from __future__ import annotations

import base_weights
import pytest
import torch
import train_helpers as th

import comfy_runtime

pytestmark = pytest.mark.comfy

TRAIN = dict(variant="auto", rank=4, min_rank=-1, schedule_power=1.0, steps=2, learning_rate=1e-2,
             batch_size=1, seed=0, target_layers="attention", training_dtype="auto",
             gradient_checkpointing=True, save_every=0, resume_from="none")
FAMILIES = ("sdxl", "flux")


def _empty_latent(family: str) -> dict:
    spec = comfy_runtime.family_spec(family)
    kind = "EmptyLatentImage" if spec.latent_channels == 4 else "EmptySD3LatentImage"
    return {"class_type": kind, "inputs": {"width": 64, "height": 64, "batch_size": 1}}


def _sampler(model, latent) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["2", 0], "latent_image": latent, "denoise": 1.0}}


def _graph(family: str, base: dict, before: str, lora_name: str) -> dict:
    """``before``: what feeds T-LoRA Train: "base", "tlora" (T-LoRA Loader) or "stock" (LoRA loader)."""
    graph = {
        "1": base,
        "2": {"class_type": "TLoRATestTinyTextEncode", "inputs": {"clip": ["c", 0], "text": "a photo of sks dog"}},
        "c": {"class_type": "TLoRATestTinyClipLoader", "inputs": {"family": family}},
        "v": {"class_type": "TLoRATestTinyVaeLoader", "inputs": {"family": family}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["v", 0]}},
        "6": _empty_latent(family),
        "tl": {"class_type": "TLoRALoader", "inputs": {
            "model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0, "min_rank": -1,
            "schedule_power": 0.0, "schedule_ordinary_lora": False}},
        "st": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0}},
        "5": {"class_type": "TLoRATrain", "inputs": {
            "model": {"base": ["1", 0], "tlora": ["tl", 0], "stock": ["st", 0]}[before],
            "latents": ["4", 0], "positive": ["2", 0], **TRAIN, "file_name": "first"}},
        "7": _sampler(["5", 0], ["6", 0]),
        # After the run: the base itself, a stock LoRA on the base, a second training of the base.
        # Zeroed, node 7's latent is the empty latent again, but node 9 now waits for node 7.
        "z7": {"class_type": "TLoRATestZeroLatentAfter", "inputs": {"after": ["7", 0]}},
        "9": _sampler(["1", 0], ["z7", 0]),
        "10": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0}},
        "11": _sampler(["10", 0], ["9", 0]),
        "12": {"class_type": "TLoRATrain", "inputs": {
            "model": ["1", 0], "latents": ["11", 0], "positive": ["2", 0], **TRAIN, "file_name": "second"}},
        "13": _sampler(["12", 0], ["6", 0]),
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["v", 0]}},
        "15": {"class_type": "PreviewImage", "inputs": {"images": ["14", 0]}},
    }
    return graph


def _base_alone(family: str, base: dict) -> dict:
    return {"1": base,
            "c": {"class_type": "TLoRATestTinyClipLoader", "inputs": {"family": family}},
            "2": {"class_type": "TLoRATestTinyTextEncode", "inputs": {"clip": ["c", 0], "text": "a photo of sks dog"}},
            "v": {"class_type": "TLoRATestTinyVaeLoader", "inputs": {"family": family}},
            "6": _empty_latent(family), "7": _sampler(["1", 0], ["6", 0]),
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["v", 0]}},
            "p": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}}


def write_tlora(trainable, folder, name: str) -> str:
    """A small trained T-LoRA file for ``trainable``'s shapes in ``folder`` (the loras folder)."""
    from comfyui_tlora.tlora_core.files.write import save_tlora
    from comfyui_tlora.tlora_core.inventory import inventory_from_module

    family = th.family_id(trainable)
    _, latents, positive = th.node_inputs(family)
    result = th.train(trainable, latents, positive, variant="tlora", rank=4, min_rank=2, steps=3,
                      learning_rate=3e-2, seed=7)
    save_tlora(folder / name, result.weights, inventory=inventory_from_module(trainable.model.diffusion_model))
    return name


def run_sequence(family: str, model, before: str, folder, record, trainable=None):
    """Run the sequence graph on ``model`` (a MODEL as a loader node returned it, handed to the
    prompt as the same object every time) and check everything the module docstring promises.
    ``trainable``: a float model of the same shapes to make the given T-LoRA file on (default
    ``model``). Returns the executor of the sequence's prompt."""
    import tiny_nodes

    tiny_nodes.register()
    key = f"{family}-{id(model)}"
    tiny_nodes.SHARED[key] = model
    try:
        lora_name = write_tlora(trainable or model, folder, f"given_{family}.safetensors")
        base = {"class_type": "TLoRATestSharedModel", "inputs": {"key": key}}
        weights = base_weights.weights(model)
        captures = record(model)
        alone, _ = comfy_runtime.run_prompt(_base_alone(family, base))
        assert alone.success
        executor, server = comfy_runtime.run_prompt(_graph(family, base, before, lora_name))
        errors = [m for m in server.messages if m[0] == "execution_error"]
        assert executor.success, errors
        assert (folder / "first.safetensors").is_file() and (folder / "second.safetensors").is_file()
        # The base sampled after the run is the base sampled before it.
        after = comfy_runtime.node_output(executor, "9")["samples"]
        assert torch.equal(after, comfy_runtime.node_output(alone, "7")["samples"])
        # Each T-LoRA Train run leaves the base's weights as they were: the same tensors (storage),
        # inference tensors still, with the same values.
        assert len(captures) == 2
        for run, (then, now) in enumerate(captures):
            assert now.keys() == then.keys()
            for k, (where, inference, values) in then.items():
                assert now[k][0] == where, f"{k}: T-LoRA Train (run {run + 1}) replaced the weight's data"
                assert now[k][1] == inference, f"{k}: T-LoRA Train changed the weight's inference-ness"
                assert torch.equal(now[k][2], values), f"{k}: T-LoRA Train changed the base's weight"
        final = base_weights.weights(model)
        assert all(torch.equal(final[k][2], values) for k, (_, _, values) in weights.items())
        assert all(final[k][1] == inference for k, (_, inference, _) in weights.items())
        return executor
    finally:
        tiny_nodes.SHARED.pop(key, None)


@pytest.mark.parametrize("before", ["base", "tlora", "stock"])
@pytest.mark.parametrize("family", FAMILIES)
def test_train_after_a_loader_and_the_base_after_train(family, before, loras_dir, after_each_training):
    run_sequence(family, th.node_inputs(family)[0], before, loras_dir, after_each_training)
