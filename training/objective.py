"""The training objective, in the model's native prediction space, through ComfyUI's model_sampling.

Per sample: draw a noise level, noise the latent with ``model_sampling.noise_scaling`` and regress
the model's raw output on its native target with MSE (the paper's objective; ComfyUI's own trainer
instead compares denoised latents, which weights an eps model's error by sigma^2):

- discrete eps models (SDXL): ``t ~ U{0..999}``, ``sigma = sigmas[t]``, ``x_t = x0 + sigma * eps``
  (ComfyUI's EPS form of DDPM's ``sqrt(a) x0 + sqrt(1-a) eps``), target ``eps``; the rank schedule
  sees ``t`` itself, as the reference SDXL code.
- flow models (FLUX): ``sigma ~ U(0, 1)`` unshifted (the reference code; the other densities of
  :data:`.timesteps.TIMESTEP_SAMPLINGS` on request), ``x_t = (1 - sigma) x0 + sigma * eps``,
  target the velocity ``eps - x0``; the schedule sees ``t = 1000 * sigma``.

The schedule timesteps follow the one rule of :mod:`.timesteps`, which the Loader applies to the
sigmas of sampling, so a trained adapter sees the same masks at inference as in training.

The raw output is captured by a forward hook on the diffusion model (what its call returns, after
every ``DIFFUSION_MODEL`` wrapper; a hook because some model classes, SD3's MMDiT, run no such
wrappers) while the model is called through ``BaseModel.apply_model`` with the patcher's
transformer options and wrappers, so every conditioning conversion and patch ComfyUI applies when
sampling also applies when training.
"""

from __future__ import annotations

import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import torch

from .timesteps import check_sampling, draw_flow_sigmas, schedule_timesteps, timestep_rule


def objective_kind(model_sampling) -> str:
    """``"eps"`` (discrete SD/SDXL) or ``"flow"`` (FLUX); ValueError for anything else."""
    try:
        rule = timestep_rule(model_sampling)
    except ValueError:
        rule = None
    if rule == "flow":
        return "flow"
    if rule == "discrete" and type(model_sampling).calculate_denoised is \
            comfy.model_sampling.EPS.calculate_denoised:
        return "eps"
    raise ValueError("T-LoRA training supports epsilon-prediction models with discrete timesteps "
                     "(SDXL) and flow models (FLUX); this model uses "
                     f"{type(model_sampling).__mro__[1].__name__} sampling. Remove any node that "
                     "changes the model's sampling (ModelSampling*) before training.")


def draw_noise_levels(model_sampling, batch: int, generator: torch.Generator, sampling: str = "uniform",
                      logit_mean: float = 0.0, logit_std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma (B,) float32, schedule timestep (B,) float64), drawn on the CPU from ``generator``;
    ``sampling`` etc.: :func:`.timesteps.draw_flow_sigmas` (flow models; discrete: uniform only)."""
    if objective_kind(model_sampling) == "flow":
        sigma = draw_flow_sigmas(model_sampling, batch, generator, sampling, logit_mean, logit_std)
        return sigma.float(), schedule_timesteps(model_sampling, sigma, rule="flow")
    check_sampling("discrete", sampling)
    n = int(model_sampling.sigmas.shape[0])
    t = torch.randint(0, n, (batch,), generator=generator)
    return model_sampling.sigmas.detach().cpu()[t].float(), t.to(torch.float64)


def noisy_input_and_target(model_sampling, x0: torch.Tensor, noise: torch.Tensor,
                           sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t`` (ComfyUI's ``noise_scaling``) and the native-space regression target."""
    x_t = model_sampling.noise_scaling(sigma, noise, x0, max_denoise=False)
    target = noise - x0 if objective_kind(model_sampling) == "flow" else noise
    return x_t, target


def weighted_mse(pred: torch.Tensor, target: torch.Tensor,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of each sample's MSE; with ``weight`` (B, 1, H, W), or (B, 1, 1, H, W)
    for 5-D latents, the MSE inside the weighted region (sum w e^2 / sum w, the weight broadcast
    over channels and frames), i.e. the subject mask's area only."""
    err = (pred.float() - target.float()).square()
    dims = tuple(range(1, err.ndim))
    if weight is None:
        return err.mean(dim=dims).mean()
    w = weight.to(err.dtype).expand(err.shape)
    return ((err * w).sum(dim=dims) / w.sum(dim=dims)).mean()


class NativePredictor:
    """``predict(x_t, sigma, conds)`` -> the diffusion model's raw output (eps / velocity)."""

    def __init__(self, patcher) -> None:
        self.patcher = patcher
        self._captured: torch.Tensor | None = None

    def _capture(self, module, args, output) -> None:
        self._captured = output

    def transformer_options(self, sigma: torch.Tensor) -> dict:
        options = comfy.model_patcher.create_model_options_clone(self.patcher.model_options)
        to = options["transformer_options"]
        comfy.patcher_extension.merge_nested_dicts(to.setdefault("wrappers", {}), self.patcher.wrappers,
                                                   copy_dict1=False)
        comfy.patcher_extension.merge_nested_dicts(to.setdefault("callbacks", {}), self.patcher.callbacks,
                                                   copy_dict1=False)
        to["sigmas"] = sigma
        to["cond_or_uncond"] = [0] * int(sigma.shape[0])
        return to

    def __call__(self, x_t: torch.Tensor, sigma: torch.Tensor, conds: dict) -> torch.Tensor:
        model = self.patcher.model
        kwargs = dict(conds)
        kwargs["transformer_options"] = self.transformer_options(sigma)
        self._captured = None
        wrapper = self.patcher.model_options.get("model_function_wrapper")
        hook = model.diffusion_model.register_forward_hook(self._capture)
        try:
            if wrapper is not None:
                wrapper(model.apply_model, {"input": x_t, "timestep": sigma, "c": kwargs,
                                            "cond_or_uncond": kwargs["transformer_options"]["cond_or_uncond"]})
            else:
                model.apply_model(x_t, sigma, **kwargs)
            if self._captured is None:
                raise RuntimeError("the diffusion model was not called (a patch on this MODEL skips it); "
                                   "remove caching / skipping patches before training")
            return self._captured
        finally:
            hook.remove()
            self._captured = None
