"""Installing a T-LoRA on a ComfyUI ModelPatcher: the rank mask of each model call, per sample.

Contract. For every model call with per-sample noise levels ``sigma`` (B,), each adapted module
returns ``W x_b + strength * delta(x_b, M_{t_b})`` (paper Eq. 5 / Eq. 8, with
:func:`tlora_core.adapter.lowrank_delta`), where ``t_b`` is the timestep the reference code feeds its
schedule, computed from the model's own ``model_sampling``:

- discrete models (SD / SDXL, eps or v): ``t = model_sampling.timestep(sigma)``, the nearest of the
  1000 training timesteps (0..999), as the reference SDXL code uses the scheduler's timestep;
- flow models (FLUX, SD3 and other CONST models): ``t = 1000 * sigma``. ``ModelSamplingFlux.timestep``
  returns sigma itself (in [0, 1]), so feeding it to a schedule written for [0, 1000) would leave
  FLUX at full rank on every step.

Mechanism. One :class:`TLoRAPatch` per applied file holds the adapters, the strength and a
:class:`tlora_core.apply.RankState`. It is registered on the clone under one unique key as
- a ``PatcherInjection``: forward hooks on the target modules, added when ComfyUI injects the
  model (``patch_model`` / end of ``use_ejected``) and removed on eject (``unpatch_model``,
  ``detach``, start of ``use_ejected``), so the unpatched model is exactly the base model;
- an ``APPLY_MODEL`` wrapper: it turns the call's sigmas into timesteps, sets them on the state for
  the duration of the call and always clears them, so masks are computed once per call (cached by
  the state) and no layer synchronises with the host;
- an attachment (``patcher.get_attachment(key)``) so other code can find the holder.
Nothing is a process global: stacked T-LoRAs are separate holders with separate states and keys.
"""

from __future__ import annotations

import logging
import uuid

import comfy.model_sampling
import comfy.patcher_extension
import torch

from ..tlora_core.apply import RankState, attach, detach
from ..tlora_core.schedule import DEFAULT_T, FLOW_TIMESTEP_SCALE
from ..tlora_core.weights import TLoRAWeights

log = logging.getLogger(__name__)

KEY_PREFIX = "tlora_"


def timestep_kind(model_sampling) -> str:
    """``"flow"`` (t = 1000 sigma), ``"discrete"`` (nearest training timestep) or raise ValueError."""
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


def schedule_timesteps(model_sampling, sigma: torch.Tensor, T: int = DEFAULT_T) -> torch.Tensor:
    """Per-sample timesteps in [0, T] for the rank schedule, from per-sample sigmas (B,)."""
    sigma = torch.as_tensor(sigma).reshape(-1)
    if timestep_kind(model_sampling) == "flow":
        return (sigma.to(torch.float64) * FLOW_TIMESTEP_SCALE).clamp(0, T)
    # ModelSamplingDiscrete.timestep is the nearest index into its own table, used explicitly so a
    # subclass that redefines timestep() (EDM variants) still gives the training timestep.
    t = comfy.model_sampling.ModelSamplingDiscrete.timestep(model_sampling, sigma)
    return t.to(torch.float64).clamp(0, T)


def check_targets(diffusion_model: torch.nn.Module, weights: TLoRAWeights) -> dict[str, torch.nn.Module]:
    """The target modules of ``weights`` in ``diffusion_model``; ValueError listing what does not fit."""
    problems: list[str] = []
    modules: dict[str, torch.nn.Module] = {}
    for name, group in weights.adapters.items():
        try:
            module = diffusion_model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such module")
            continue
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim != 2:
            problems.append(f"{name}: not a Linear layer")
            continue
        out_features, in_features = weight.shape
        for adapter in group:
            start, stop = adapter.out_rows or (0, adapter.up.shape[0])
            if adapter.in_features != in_features or stop > out_features or (
                    adapter.out_rows is None and stop != out_features):
                problems.append(f"{name}: layer is ({out_features} x {in_features}), adapter needs "
                                f"in {adapter.in_features}, out rows [{start}, {stop})")
        modules[name] = module
    if problems:
        raise ValueError(f"{len(problems)} of {len(weights.adapters)} T-LoRA targets do not fit this "
                         f"{weights.architecture} model, e.g. " + "; ".join(problems[:4]))
    return modules


class TLoRAPatch:
    """The holder of one applied T-LoRA: adapters, strength, rank state and hook handles."""

    def __init__(self, weights: TLoRAWeights, strength: float, key: str) -> None:
        self.weights = weights
        self.strength = float(strength)
        self.key = key
        self.state = RankState()
        # Hook handles per model object: clones share this holder, and most share one model, but
        # some carry another (a dynamic-VRAM model's non-dynamic delegate, the copy T-LoRA Train
        # trains on), which needs its own hooks.
        self.handles: dict[int, list] = {}
        self.calls = 0   # model calls seen by the wrapper (diagnostics and tests)

    def inject(self, patcher) -> None:
        # ComfyUI may call inject on a clone that believes it is not injected while hooks from
        # an earlier injection of the same holder are still on its model: never register twice.
        model_id = id(patcher.model)
        if model_id in self.handles:
            return
        modules = check_targets(patcher.model.diffusion_model, self.weights)
        for group in self.weights.adapters.values():
            for adapter in group:
                adapter.tensors_on(torch.device(patcher.load_device))   # copy once, not on first call
        self.handles[model_id] = attach(modules, self.weights.adapters, self.state, self.strength)

    def eject(self, patcher) -> None:
        detach(self.handles.pop(id(patcher.model), []))
        if not self.handles:
            self.state.clear()

    def release(self, patcher, *args) -> None:
        """ON_DETACH: the model left its device, so drop the adapters' copies there too."""
        for group in self.weights.adapters.values():
            for adapter in group:
                adapter.release_device_copies()

    def apply_model_wrapper(self, executor, x, t, *args, **kwargs):
        """``BaseModel.apply_model`` wrapper: ``t`` is the per-sample sigma of this call."""
        timesteps = schedule_timesteps(executor.class_obj.model_sampling, t)
        self.calls += 1
        with self.state.at(timesteps):
            return executor(x, t, *args, **kwargs)


def install(patcher, weights: TLoRAWeights, strength: float = 1.0, key: str | None = None) -> TLoRAPatch:
    """Apply ``weights`` to ``patcher`` (a clone the caller owns) and return the holder.

    Everything is checked before the patcher is touched (targets, shapes, model sampling), so a
    failure leaves it unchanged. ``key`` defaults to a fresh unique key, so every call adds an
    independent T-LoRA with its own schedule.
    """
    model = patcher.model
    timestep_kind(patcher.get_model_object("model_sampling"))
    check_targets(model.diffusion_model, weights)
    key = key or f"{KEY_PREFIX}{uuid.uuid4().hex}"
    if patcher.get_injections(key) is not None:
        raise ValueError(f"a T-LoRA is already installed under the key {key!r}")
    holder = TLoRAPatch(weights, strength, key)
    patcher.set_injections(key, [comfy.patcher_extension.PatcherInjection(holder.inject, holder.eject)])
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key,
                                 holder.apply_model_wrapper)
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, key, holder.release)
    patcher.set_attachments(key, holder)
    log.info("T-LoRA: %d layers (%s, %s), strength %g, schedule %s", len(weights.adapters),
             weights.architecture, weights.variant, strength, weights.schedule)
    return holder


def installed(patcher) -> list[TLoRAPatch]:
    """The T-LoRA holders installed on ``patcher`` (in installation order)."""
    return [a for a in patcher.attachments.values() if isinstance(a, TLoRAPatch)]
