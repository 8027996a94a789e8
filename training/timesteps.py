"""The timestep the rank schedule sees at a model call: one rule for the Loader, Preview and trainer.

Contract. For per-sample noise levels ``sigma`` the schedule (paper Eq. 6) is fed the timestep the
reference code feeds it, by the family's rule (``Family.timestep``, :mod:`tlora_core.families`):

- ``"discrete"`` (SD / SDXL, eps or v): ``t = ModelSamplingDiscrete.timestep(sigma)``, the nearest
  of the model's own 1000 training timesteps (0..999), as the reference SDXL code uses the
  scheduler's timestep;
- ``"flow"`` (FLUX and every CONST model): ``t = 1000 * sigma``, sigma being the one the model
  samples at (after its shift). Not ``model_sampling.timestep()``: ``ModelSamplingFlux`` returns
  sigma itself (in [0, 1], which would leave FLUX at full rank on every step), and
  ``ModelSamplingDiscreteFlow`` returns ``sigma * multiplier``, where the multiplier is 1000 for
  SD3 but 1 for Z-Image and Anima.

A model whose sampling does not fit its family's rule (a ModelSampling* node switched it to
continuous EDM / V sampling) is refused with a message, before anything is patched.

Training draws the noise levels here too (:func:`draw_flow_sigmas`, :data:`TIMESTEP_SAMPLINGS`), so
the sigma the trainer samples and the timestep the schedule sees come from one place. Flow
families: ``uniform`` ``sigma ~ U(0, 1)`` (the reference code), ``logit-normal``
``sigma = sigmoid(n)``, ``n ~ N(logit_mean, logit_std^2)`` (SD3's training density), and either of
them ``shifted`` by the model's own sampling shift (``model_sampling.sigma(model_sampling.timestep(u))``,
the noise level the model's sampler gives to the fraction ``u`` of its schedule: FLUX's
``exp(shift) / (exp(shift) + 1 / u - 1)``, SD3's ``shift u / (1 + (shift - 1) u)``). Discrete
families train on their 1000 timesteps drawn uniformly (the paper) and accept only ``uniform``.
"""

from __future__ import annotations

import math

import comfy.model_sampling
import torch

from ..tlora_core import families
from ..tlora_core.families import Family
from ..tlora_core.schedule import DEFAULT_T, FLOW_TIMESTEP_SCALE


def timestep_rule(model_sampling) -> str:
    """The rule this model sampling supports: ``"flow"``, ``"discrete"``, or ValueError."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return "flow"
    # Any sampling with the 1000-entry discrete table (including EDM-style ones built on it) maps
    # sigma to the training timestep the schedule was written for.
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete) and hasattr(
            model_sampling, "log_sigmas"):
        return "discrete"
    raise ValueError(
        f"T-LoRA needs a model with discrete (SD/SDXL) or flow (FLUX/SD3) sampling; this model uses "
        f"{type(model_sampling).__mro__[1].__name__}, whose noise levels have no timestep in [0, 1000]. "
        "Remove any node that switches the model to continuous EDM/V sampling.")


def family_rule(family: Family, model_sampling) -> str:
    """``family.timestep``, after checking that the model's sampling supports it."""
    found = timestep_rule(model_sampling)
    if found != family.timestep:
        raise ValueError(
            f"this {family.label} model samples with {type(model_sampling).__name__} ({found} "
            f"timesteps), but {family.label} T-LoRAs are scheduled by {family.timestep} timesteps. "
            "Remove any node that changes the model's sampling (ModelSampling*) before this one.")
    return found


def model_rule(patcher) -> tuple[Family, str]:
    """The family of a ModelPatcher's model and its checked timestep rule."""
    family = families.recognise(patcher.model)
    return family, family_rule(family, patcher.get_model_object("model_sampling"))


def schedule_timesteps(model_sampling, sigma: torch.Tensor, T: int = DEFAULT_T,
                       rule: str | None = None) -> torch.Tensor:
    """Per-sample timesteps in [0, T] (float64) for the rank schedule, from per-sample sigmas (B,).

    ``rule``: the family's (see :func:`family_rule`); None = the one the sampling supports.
    """
    sigma = torch.as_tensor(sigma).reshape(-1)
    if (rule or timestep_rule(model_sampling)) == "flow":
        return (sigma.to(torch.float64) * FLOW_TIMESTEP_SCALE).clamp(0, T)
    # ModelSamplingDiscrete.timestep is the nearest index into its own table, used explicitly so a
    # subclass that redefines timestep() (EDM variants) still gives the training timestep.
    t = comfy.model_sampling.ModelSamplingDiscrete.timestep(model_sampling, sigma)
    return t.to(torch.float64).clamp(0, T)


TIMESTEP_SAMPLINGS = ("uniform", "logit-normal", "uniform shifted", "logit-normal shifted")


def check_sampling(rule: str, sampling: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                   label: str = "this model") -> None:
    """ValueError for an unknown sampling, a non-uniform one on a discrete family, or a bad std."""
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"unknown timestep_sampling {sampling!r} (choices: {', '.join(TIMESTEP_SAMPLINGS)})")
    if rule != "flow" and sampling != "uniform":
        raise ValueError(f"timestep_sampling {sampling!r} is for flow models (FLUX, SD3, ...); {label} "
                         "trains on its 1000 discrete timesteps drawn uniformly, as the paper: set "
                         "timestep_sampling to uniform")
    if sampling.startswith("logit-normal") and not (
            math.isfinite(logit_mean) and math.isfinite(logit_std) and logit_std > 0):
        raise ValueError(f"logit_std must be a positive number and logit_mean finite, got "
                         f"{logit_std} and {logit_mean}")


def draw_flow_sigmas(model_sampling, batch: int, generator: torch.Generator, sampling: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Per-sample training sigmas (B,) float64 in [0, 1] of a flow model, drawn on the CPU from
    ``generator`` by ``sampling`` (see the module docstring)."""
    if sampling.startswith("logit-normal"):
        normal = torch.randn(batch, generator=generator, dtype=torch.float64)
        u = torch.sigmoid(normal * float(logit_std) + float(logit_mean))
    else:
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
    if sampling.endswith("shifted"):
        u = torch.as_tensor(model_sampling.sigma(model_sampling.timestep(u)), dtype=torch.float64)
    return u
