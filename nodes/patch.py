"""Installing a T-LoRA on a ComfyUI ModelPatcher: the rank mask of each model call, per sample.

Contract. For every model call with per-sample noise levels ``sigma`` (B,), each adapted module
returns ``W x_b + strength * delta(x_b, M_{t_b})`` (paper Eq. 5 / Eq. 8, with
:func:`tlora_core.adapter.lowrank_delta`), where ``t_b`` is the timestep the reference code feeds its
schedule, by the model family's rule (:mod:`training.timesteps`: the discrete timestep on SDXL,
``1000 * sigma`` on FLUX).

Mechanism. One :class:`TLoRAPatch` per applied file holds the adapters, the strength and a
:class:`tlora_core.masks.RankState`. It is registered on the clone under one unique key as
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

import comfy.patcher_extension
import torch

from ..tlora_core.apply import attach, detach
from ..tlora_core.inventory import UnsupportedLayer, linear_shape
from ..tlora_core.masks import RankState
from ..tlora_core.weights import TLoRAWeights
from ..training.timesteps import model_rule, schedule_timesteps

log = logging.getLogger(__name__)

KEY_PREFIX = "tlora_"


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
        try:
            shape = linear_shape(module)
        except UnsupportedLayer as err:
            problems.append(f"{name}: {err}")
            continue
        if shape is None:
            problems.append(f"{name}: not a Linear layer ({type(module).__name__})")
            continue
        out_features, in_features = shape
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

    def __init__(self, weights: TLoRAWeights, strength: float, key: str, rule: str) -> None:
        self.weights = weights
        self.rule = rule   # the family's timestep rule (training.timesteps)
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
        timesteps = schedule_timesteps(executor.class_obj.model_sampling, t, rule=self.rule)
        self.calls += 1
        with self.state.at(timesteps):
            return executor(x, t, *args, **kwargs)


def install(patcher, weights: TLoRAWeights, strength: float = 1.0, key: str | None = None) -> TLoRAPatch:
    """Apply ``weights`` to ``patcher`` (a clone the caller owns) and return the holder.

    Everything is checked before the patcher is touched (the model's family and sampling, targets,
    shapes), so a failure leaves it unchanged. ``key`` defaults to a fresh unique key, so every call adds an
    independent T-LoRA with its own schedule.
    """
    model = patcher.model
    _, rule = model_rule(patcher)
    check_targets(model.diffusion_model, weights)
    key = key or f"{KEY_PREFIX}{uuid.uuid4().hex}"
    if patcher.get_injections(key) is not None:
        raise ValueError(f"a T-LoRA is already installed under the key {key!r}")
    holder = TLoRAPatch(weights, strength, key, rule)
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
