"""Test support for the trainer: node-like inputs, direct loop runs, fixed-pair loss, model snapshots.

Inputs are made under ``torch.inference_mode()`` like the outputs of real ComfyUI nodes, so every
test also exercises the inference-tensor trap.
"""

from __future__ import annotations

import torch

import comfy_runtime

SIZE = 8   # latent side: the tiny models' smallest comfortable size, keeps each step ~0.1 s


def node_inputs(family: str, images: int = 1, seed: int = 5, size: int = SIZE):
    """(MODEL, LATENT, CONDITIONING) as nodes would pass them: inference tensors."""
    with torch.inference_mode():
        model = comfy_runtime.build_model(family)
        gen = torch.Generator().manual_seed(seed)
        latents = {"samples": torch.randn(comfy_runtime.latent_shape(family, images, size), generator=gen)}
        positive = comfy_runtime.fake_conditioning(family)
    return model, latents, positive


def training_data(model, latents, positive, mask=None):
    from comfyui_tlora.training import inputs

    family = inputs.family_of(model.model)
    samples = inputs.latent_samples(latents, model.model, family)
    weights = inputs.loss_weights(mask, samples, family.latent_downscale)
    with torch.inference_mode(False):
        return inputs.prepare_data(model.model, family, samples, positive, weights, torch.device("cpu"))


def train(model, latents, positive, *, mask=None, **config):
    """Run :func:`training.loop.train` as the node does (inside inference mode)."""
    from comfyui_tlora.training import loop

    on_step = config.pop("on_step", None)
    with torch.inference_mode():
        data = training_data(model, latents, positive, mask)
        return loop.train(model, data, loop.TrainConfig(**config), on_step=on_step)


def fixed_pair_loss(patcher, latents, positive, pairs: int = 8, seed: int = 123) -> float:
    """Native-space MSE of ``patcher`` on the training latent at fixed (noise level, noise) pairs
    spread over the whole schedule; the same pairs for every patcher."""
    import comfy.model_management
    from comfyui_tlora.training import objective

    ms = patcher.model.model_sampling
    data = training_data(patcher, latents, positive)
    comfy.model_management.load_models_gpu([patcher])
    with torch.inference_mode(False), torch.no_grad():
        x0, conds, _ = data.batch([0] * pairs, torch.device("cpu"))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        if objective.objective_kind(ms) == "flow":
            sigma = torch.linspace(0.05, 0.95, pairs)
        else:
            sigma = ms.sigmas[torch.linspace(0, 999, pairs).long()]
        x_t, target = objective.noisy_input_and_target(ms, x0, noise, sigma)
        return float(objective.weighted_mse(objective.NativePredictor(patcher)(x_t, sigma, conds), target))


def apply(model, weights):
    """``model`` with ``weights`` installed the Loader's way (a clone)."""
    from comfyui_tlora.nodes.patch import install

    out = model.clone()
    install(out, weights, 1.0)
    return out


def snapshot(model) -> dict:
    """Everything training must leave as it found it on the diffusion model."""
    dm = model.model.diffusion_model
    return {
        "tensors": {k: v.detach().clone() for k, v in dm.state_dict(keep_vars=True).items()},
        "objects": {k: id(v) for k, v in dm.state_dict(keep_vars=True).items()},
        "requires_grad": {n: p.requires_grad for n, p in dm.named_parameters()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in dm.modules()),
        "functions": {n: (len(getattr(m, "weight_function", [])), len(getattr(m, "bias_function", [])))
                      for n, m in dm.named_modules()},
        "forwards": [n for n, m in dm.named_modules() if "forward" in m.__dict__],
        # ComfyUI's cast / streaming marks: a run must not leave a layer marked as streamed.
        "casts": {n: (getattr(m, "comfy_cast_weights", None), hasattr(m, "prev_comfy_cast_weights"))
                  for n, m in dm.named_modules()},
        "manual_cast": model.model.manual_cast_dtype,
    }


def assert_restored(before: dict, model) -> None:
    after = snapshot(model)
    for key, tensor in before["tensors"].items():
        assert torch.equal(tensor, after["tensors"][key]), f"{key} changed"
    for key in ("objects", "requires_grad", "hooks", "functions", "forwards", "casts", "manual_cast"):
        assert before[key] == after[key], f"{key} not restored"


def family_id(patcher) -> str:
    """The pack's family id of ``patcher``'s model."""
    from comfyui_tlora.training.inputs import family_of

    return family_of(patcher.model).id
