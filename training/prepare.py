"""Making a ComfyUI MODEL trainable in-process, and putting everything back afterwards.

ComfyUI runs nodes under ``torch.inference_mode()``, so a MODEL loaded by a node has *inference
tensors* as parameters and backward through them fails ("Inference tensors cannot be saved for
backward"). :func:`trainable_model` works around that without changing the MODEL:

- ComfyUI's process-wide training switches are set for the run and restored on every exit
  (:func:`comfy_training_flags`; they exist from ComfyUI 0.33 on), and so are the ops the
  family's recipe swaps for differentiable ones (:mod:`.runtime_fixes`: Anima's rotary embedding);
- it trains on a ``clone()`` of the ModelPatcher (the caller's patcher gets no new patch), loaded
  through ComfyUI's own ``load_models_gpu`` so LoRAs merged upstream are part of the base. A
  dynamic-VRAM patcher (ComfyUI 0.33+ on a GPU) streams weights through a cache whose tensors can
  be handed to a layer as they are, so training uses ComfyUI's non-dynamic delegate of it
  (``clone(disable_dynamic=True)``: the model re-loaded by its own loader, as ComfyUI's trainer
  does with ``force_deepcopy``);
- it loads the clone under ``torch.inference_mode()``, as ComfyUI's own nodes load models: loaded
  outside it, ComfyUI's quantized layers swap the MODEL's weight Parameters for non-inference
  clones (``ops._quantized_apply``), and the next ComfyUI load of the MODEL fails ("Cannot set
  version_counter for inference tensor"). The base's weights stay the same tensors;
- through ComfyUI's partial loading (:class:`LoadPlan`): ``memory_required`` is the run's working
  set, and an optional cap bounds the resident weights (ComfyUI's own ``partially_unload`` trims a
  load that kept more). Layers that do not fit stream: ComfyUI casts their weight to the device
  in every forward. While anything streams, block checkpointing is on;
- after each load, the layers get the weights autograd may keep (:mod:`.layer_weights`): a
  resident layer holding plain tensors computes with zero-copy ordinary aliases of its inference
  parameters (swapped in for the training steps, :class:`TrainingLoad`; FLUX's QK-norm scales
  too); every other layer keeps a weight function registered with ComfyUI's ``add_weight_wrapper``
  (re-applied by every load, so it survives validation sampling) that clones a streamed layer's
  cast (ComfyUI may cast it into a buffer it reuses) and a quantized layer's cached copy. A
  quantized layer with a function dequantizes its weight first, so training runs the base in the
  compute dtype, forward and backward (ComfyUI's fp8 backward, ``training_fp8_bwd``, stays off:
  :data:`TRAINING_FLAGS`);
- every base parameter gets ``requires_grad = False`` (ComfyUI creates them with True, which would
  send gradients into the base weights);
- optionally each block is wrapped in non-reentrant gradient checkpointing (the family's
  ``checkpoint_blocks``: SDXL ResBlocks and transformer blocks, FLUX double / single blocks). FLUX
  needs it (``recipe.needs_checkpointing``): its blocks update ``img`` / ``txt`` / ``x`` in place
  (``+=``), which breaks autograd unless the block's inputs are cloned and its activations
  recomputed.

Everything is undone in ``finally``, in reverse order, whatever happens inside (Cancel, NaN, OOM):
the base weights are never written, only swapped objects are put back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import comfy.model_management
import torch
import torch.utils.checkpoint

from ..tlora_core import families
from .layer_weights import (
    BackwardSafe,
    ResidentAliases,
    add_backward_safe_functions,
    is_comfy_op,
    remove_backward_safe_functions,
    streams,
)
from .runtime_fixes import runtime_fixes

__all__ = ["BackwardSafe", "LoadPlan", "Residency", "TrainingLoad", "is_comfy_op", "reload", "release",
           "residency", "streams", "trainable_model"]

log = logging.getLogger(__name__)


# ComfyUI's process-wide training switches (module attributes of comfy.model_management, absent
# before 0.33) and their values during a T-LoRA run:
# - in_training: True makes FLUX-style RoPE (and other comfy_kitchen kernels without an autograd
#   formula) take their differentiable pure-torch path;
# - training_fp8_bwd: False keeps the backward of quantized (fp8) layers in the compute dtype; it
#   is left set by ComfyUI's own trainer when its quantized_backward option was used.
TRAINING_FLAGS = {"in_training": True, "training_fp8_bwd": False}
GIB = 2 ** 30
LOAD_KEY = "tlora_train_load"   # the training clone's attachment holding its TrainingLoad


@contextmanager
def comfy_training_flags() -> Iterator[None]:
    """Set :data:`TRAINING_FLAGS` where this ComfyUI has them; restore the old values on any exit."""
    mm = comfy.model_management
    saved = {name: getattr(mm, name) for name in TRAINING_FLAGS if hasattr(mm, name)}
    try:
        for name in saved:
            setattr(mm, name, TRAINING_FLAGS[name])
        yield
    finally:
        for name, value in saved.items():
            setattr(mm, name, value)


def _training_clone(patcher):
    """A clone to train on: a plain clone, or the non-dynamic delegate of a dynamic-VRAM patcher."""
    is_dynamic = getattr(patcher, "is_dynamic", None)
    if not (callable(is_dynamic) and is_dynamic()):
        return patcher.clone()
    if getattr(patcher, "cached_patcher_init", None) is None:
        raise RuntimeError(
            "T-LoRA Train: this MODEL uses ComfyUI's dynamic VRAM loading but was not made by a core "
            "loader (Load Checkpoint, Load Diffusion Model), so ComfyUI cannot give a trainable copy "
            "of it. Load it with a core loader, or start ComfyUI with --disable-dynamic-vram.")
    log.info("T-LoRA Train: training on the non-dynamic copy of a dynamic-VRAM model")
    return patcher.clone(disable_dynamic=True)


def checkpoint_blocks(dm: torch.nn.Module, block_names: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """The blocks of ``dm`` whose class is named in ``block_names`` (``Family.checkpoint_blocks``)."""
    return {name: m for name, m in dm.named_modules() if type(m).__name__ in block_names}


def _clone_floats(value):
    return value.clone() if torch.is_tensor(value) and value.is_floating_point() else value


def _checkpointed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        def block(*a, **k):
            # Cloned inside the checkpoint: the block's in-place updates then touch a copy, never
            # the saved input that backward replays the block from.
            return forward(*[_clone_floats(v) for v in a], **{n: _clone_floats(v) for n, v in k.items()})

        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)

    return run


class _Restorer:
    """Records each change as an undo action; ``undo`` runs them newest first and never stops early."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def push(self, action: Callable[[], None]) -> None:
        self._undo.append(action)

    def undo(self) -> None:
        errors = []
        while self._undo:
            action = self._undo.pop()
            try:
                action()
            except Exception as err:  # keep restoring the rest; report after
                errors.append(err)
        if errors:
            raise RuntimeError(f"T-LoRA training could not restore the model: {errors[0]}") from errors[0]


def _freeze_parameters(dm: torch.nn.Module, undo: _Restorer) -> None:
    flags = [(p, p.requires_grad) for p in dm.parameters()]

    def restore() -> None:
        for p, flag in flags:
            if p.requires_grad != flag:
                # requires_grad=True on an inference tensor may only be set in inference mode.
                with torch.inference_mode(p.is_inference()):
                    p.requires_grad_(flag)

    undo.push(restore)
    for p, _ in flags:
        p.requires_grad_(False)


def _restore_attr(module: torch.nn.Module, attr: str, old, had_own: bool) -> Callable[[], None]:
    def restore() -> None:
        if had_own:
            setattr(module, attr, old)
        else:
            module.__dict__.pop(attr, None)
    return restore


def _install_checkpointing(dm: torch.nn.Module, undo: _Restorer, block_names: tuple[str, ...]) -> int:
    blocks = checkpoint_blocks(dm, block_names)
    for module in blocks.values():
        had_own = "forward" in module.__dict__
        old = module.__dict__.get("forward")
        module.forward = _checkpointed(module.forward)
        undo.push(_restore_attr(module, "forward", old, had_own))
    return len(blocks)


@dataclass(frozen=True)
class Residency:
    """Where the comfy-op layers' weights are after a load: on the device, or streamed."""

    resident_bytes: int
    streamed_bytes: int
    streamed_layers: int
    layers: int

    def describe(self) -> str:
        if not self.streamed_layers:
            return f"all {self.layers} layers resident ({self.resident_bytes / GIB:.2f} GiB)"
        return (f"{self.resident_bytes / GIB:.2f} GiB resident, {self.streamed_bytes / GIB:.2f} GiB "
                f"streamed per forward in {self.streamed_layers} of {self.layers} layers")


def residency(patcher) -> Residency:
    """The :class:`Residency` of ``patcher``'s diffusion model as ComfyUI last loaded it."""
    resident = streamed = count = layers = 0
    for module in patcher.model.diffusion_model.modules():
        if not (is_comfy_op(module) and isinstance(getattr(module, "weight", None), torch.Tensor)):
            continue
        size = comfy.model_management.module_size(module)
        layers += 1
        if streams(module):
            streamed, count = streamed + size, count + 1
        else:
            resident += size
    return Residency(resident, streamed, count, layers)


@dataclass(frozen=True)
class LoadPlan:
    """How T-LoRA Train loads its clone, the first time and again after each validation sample.

    ``memory_required``: the run's working set in bytes (:mod:`training.memory`), what ComfyUI must
    leave free beside the resident weights. ``max_vram_bytes``: a cap on the device memory of the
    run, weights and working set together (0 = none: ComfyUI decides). Everything goes through
    ComfyUI's loader: ``load_models_gpu(force_full_load=False)`` asked for the working set (and,
    under a cap, for what leaves only the cap's room for weights), then ComfyUI's own
    ``partially_unload`` trims a load that still keeps more than the cap allows (on a CPU ComfyUI
    always loads fully, so this is also how a test makes a CPU run stream).
    """

    memory_required: int
    max_vram_bytes: int = 0
    checkpointed_required: int = 0   # the working set with checkpointing, when the run has it off

    def weight_budget(self) -> int | None:
        """Bytes of weights allowed on the device, None without a cap."""
        if not self.max_vram_bytes:
            return None
        return max(0, self.max_vram_bytes - self.memory_required)

    def checkpointed(self) -> LoadPlan:
        """The plan with gradient checkpointing on (its smaller working set)."""
        return LoadPlan(self.checkpointed_required or self.memory_required, self.max_vram_bytes)

    def fitted(self) -> LoadPlan:
        """This plan, or its checkpointed one where the working set alone exceeds the cap; refuse a
        cap that even that exceeds, before anything is loaded."""
        if not self.max_vram_bytes or self.memory_required <= self.max_vram_bytes:
            return self
        if self.checkpointed_required and self.checkpointed_required <= self.max_vram_bytes:
            log.info("T-LoRA Train: gradient checkpointing on: without it the working set "
                     "(%.2f GiB) is more than max_vram_gb", self.memory_required / GIB)
            return self.checkpointed()
        least = self.checkpointed_required or self.memory_required
        raise RuntimeError(
            f"T-LoRA Train: the run's working set alone ({least / GIB:.2f} GiB with gradient "
            "checkpointing: activations, adapters, optimizer state, offload buffers) is more than "
            f"max_vram_gb ({self.max_vram_bytes / GIB:.2f} GiB), before any weight. Raise max_vram_gb, or "
            "lower the batch size, the image size or the rank.")

    def load(self, patcher) -> Residency:
        """Load ``patcher`` as planned, under inference mode as ComfyUI's nodes do (see module
        docstring), and return where its weights ended up. On a GPU where ComfyUI kept more
        weights than leave the working set free (it keeps at least 40% of free memory for weights
        on non-NVIDIA GPUs), ComfyUI's ``partially_unload`` streams more."""
        mm = comfy.model_management
        device = patcher.load_device
        budget = self.weight_budget()
        ask = self.memory_required
        if budget is not None:
            free = mm.get_free_memory(device) + patcher.loaded_size()
            ask = max(ask, int(free - budget))
        with torch.inference_mode():
            mm.load_models_gpu([patcher], memory_required=ask, force_full_load=False)
            if budget is not None and patcher.loaded_size() > budget:
                patcher.partially_unload(patcher.offload_device,
                                         memory_to_free=patcher.loaded_size() - budget)
            if not mm.is_device_cpu(device):
                short = self.memory_required - mm.get_free_memory(device)
                if short > 0 and patcher.loaded_size() > 0:
                    patcher.partially_unload(patcher.offload_device, memory_to_free=short)
        return residency(patcher)

    def has_room(self, patcher) -> bool:
        """Whether the working set fits in what the device has free (always on a CPU)."""
        device = patcher.load_device
        mm = comfy.model_management
        return mm.is_device_cpu(device) or mm.get_free_memory(device) >= self.memory_required

    def check_room(self, patcher) -> None:
        """After the load: refuse a run whose working set does not fit beside what ComfyUI kept
        (a GPU only; a CPU's memory is the host's)."""
        if not self.has_room(patcher):
            device = patcher.load_device
            free = comfy.model_management.get_free_memory(device)
            raise RuntimeError(
                f"T-LoRA Train: after loading, {free / GIB:.2f} GiB of {device} is free but the run's "
                f"working set needs {self.memory_required / GIB:.2f} GiB ({residency(patcher).describe()}). "
                "Close other programs using the GPU, turn gradient_checkpointing on, or lower the "
                "batch size, the image size or the rank.")


@contextmanager
def trainable_model(patcher, *, gradient_checkpointing: bool,
                    compute_dtype: torch.dtype | None = None, memory_required: int = 0,
                    max_vram_bytes: int = 0, checkpointed_required: int = 0) -> Iterator:
    """Yield a loaded clone of ``patcher`` whose diffusion model can be backpropagated through.

    Must be entered with inference mode off and grad on (the caller's training context). The
    clone is what the caller attaches training hooks to; ``patcher`` itself is never modified.
    ``compute_dtype``: run the base in this dtype (ComfyUI casts weights per layer), None = as is.
    ``memory_required``: the run's working set beside the weights, ``max_vram_bytes``: an optional
    cap (:class:`LoadPlan`); ComfyUI unloads other models (text encoders, VAE) from the device to
    make room and streams the layers that do not fit. ``checkpointed_required``: the working set
    with gradient checkpointing, when ``gradient_checkpointing`` is off: checkpointing is turned
    on where only that fits (or where anything streams). :func:`reload` loads the clone again the
    same way (after a validation sample loaded another clone).
    """
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        raise RuntimeError("trainable_model needs torch.inference_mode(False) and torch.enable_grad()")
    family = families.recognise(patcher.model)
    asked = LoadPlan(int(memory_required), int(max_vram_bytes),
                     0 if gradient_checkpointing else int(checkpointed_required))
    plan = asked.fitted()
    gradient_checkpointing = gradient_checkpointing or plan is not asked
    with ExitStack() as stack:
        stack.enter_context(comfy_training_flags())
        stack.enter_context(runtime_fixes(family))
        train_patcher = _training_clone(patcher)
        # A compute dtype set upstream (ModelComputeDtype) comes as an object patch, which the clone
        # keeps, plus forced casts, which the run drops: they leave every layer marked as streamed
        # on the shared model (and 0.3.75's partially_unload fails on FLUX's norms). A layer that
        # must cast keeps its weight function, which casts.
        train_patcher.force_cast_weights = False
        if compute_dtype is not None:
            # ComfyUI's set_model_compute_dtype without its forced casts (above).
            train_patcher.add_object_patch("manual_cast_dtype", compute_dtype)
            # An object patch on the shared BaseModel: take it off again (weights stay loaded).
            stack.callback(train_patcher.unpatch_model, unpatch_weights=False)
        dm = train_patcher.model.diffusion_model
        functions = add_backward_safe_functions(train_patcher, dm)
        stack.callback(remove_backward_safe_functions, dm)
        undo = _Restorer()
        stack.callback(undo.undo)
        _freeze_parameters(dm, undo)
        loads = TrainingLoad(plan, train_patcher)
        train_patcher.set_attachments(LOAD_KEY, loads)
        stack.callback(_unload_if_streamed, train_patcher, private=train_patcher.model is not patcher.model)
        stack.callback(train_patcher.attachments.pop, LOAD_KEY, None)
        stack.callback(loads.release)
        where = loads.load()
        if not gradient_checkpointing and (where.streamed_layers > 0 or not plan.has_room(train_patcher)):
            # Streamed weights are re-cast in each block's recomputation, and checkpointing's
            # smaller working set may be all that fits.
            log.info("T-LoRA Train: gradient checkpointing on (%s)", "weights stream" if
                     where.streamed_layers else "the working set without it does not fit")
            gradient_checkpointing = True
            plan = loads.plan = plan.checkpointed()
        plan.check_room(train_patcher)
        train_patcher.pre_run()
        # pre_run's pair, as around ComfyUI's own sampling and training: the shared BaseModel
        # must not keep pointing at the training clone.
        stack.callback(train_patcher.cleanup)
        blocks = _install_checkpointing(dm, undo, family.checkpoint_blocks) if gradient_checkpointing else 0
        log.info("T-LoRA Train: %s; working set %.2f GiB; predicted peak %.2f GiB on %s", where.describe(),
                 plan.memory_required / GIB, (where.resident_bytes + plan.memory_required) / GIB,
                 train_patcher.load_device)
        log.debug("trainable model: %d weight functions, %d layers without copies, %d blocks checkpointed",
                  functions, loads.aliased, blocks)
        yield train_patcher


def _unload_if_streamed(patcher, private: bool = False) -> None:
    """Unload the training clone through ComfyUI if it streamed, so the shared model keeps no
    streaming marks of the run (ComfyUI's next partial load of another clone skips layers it finds
    marked "already streamed"), or if it holds a ``private`` model (a dynamic-VRAM MODEL's
    non-dynamic delegate, which no sampler uses); a fully loaded shared clone stays, for the next
    sampler to reuse its weights."""
    if not (private or getattr(patcher.model, "model_lowvram", False)):
        return
    mm = comfy.model_management
    with torch.inference_mode():
        for i, loaded in enumerate(mm.current_loaded_models):
            if loaded.model is patcher:
                loaded.model_unload()
                mm.current_loaded_models.pop(i)
                break


class TrainingLoad:
    """The training clone's loads: ComfyUI's, by the :class:`LoadPlan`, then the zero-copy aliases
    of :mod:`.layer_weights` for the training steps; :meth:`release` takes the aliases out again
    before anything else of ComfyUI runs (a validation sample, the end of the run)."""

    def __init__(self, plan: LoadPlan, patcher) -> None:
        self.plan = plan
        self.patcher = patcher
        self.aliases = ResidentAliases(patcher.model)
        self.aliased = 0

    def load(self) -> Residency:
        self.aliases.restore()
        where = self.plan.load(self.patcher)
        self.aliased = self.aliases.apply()
        return where

    def release(self) -> None:
        self.aliases.restore()


def reload(train_patcher) -> Residency:
    """Load the training clone again as :func:`trainable_model` did (after another clone of the
    model was loaded, e.g. for a validation sample) and run its ``pre_run``."""
    where = train_patcher.get_attachment(LOAD_KEY).load()
    train_patcher.pre_run()
    return where


def release(train_patcher) -> None:
    """Hand the training clone's layers back as ComfyUI made them (before a validation sample)."""
    train_patcher.get_attachment(LOAD_KEY).release()
