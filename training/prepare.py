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
  version_counter for inference tensor"). The base's weights stay the same objects;
- through ComfyUI's partial loading (:class:`LoadPlan`): ``memory_required`` is the run's working
  set, and an optional cap bounds the resident weights (ComfyUI's own ``partially_unload`` trims a
  load that kept more). Layers that do not fit stream: ComfyUI casts their weight to the device
  in every forward. While anything streams, block checkpointing is on;
- every comfy-op layer (Linear, Conv, norms; plain, fp8, ComfyUI-quantized) gets a weight / bias
  function through ComfyUI's ``add_weight_wrapper`` (re-applied by every load of the clone, so it
  survives validation sampling): :class:`BackwardSafe` hands autograd a tensor it may keep. A
  layer with a function gets a fresh cast per forward; a copy that is still an inference tensor (a
  cached weight) is cloned; a streamed layer's cast is always cloned, because ComfyUI may cast it
  into a buffer it reuses for the next layers (AMD, ``--disable-cuda-malloc``), and autograd would
  then replay backward with another layer's weight. A quantized layer with a function dequantizes
  its weight first, so training runs the base in the compute dtype, forward and backward (ComfyUI's
  fp8 backward, ``training_fp8_bwd``, stays off: :data:`TRAINING_FLAGS`);
- other inference parameters (FLUX's QK-norm scales) are swapped for ordinary clones;
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
from .runtime_fixes import runtime_fixes

log = logging.getLogger(__name__)


# ComfyUI's process-wide training switches (module attributes of comfy.model_management, absent
# before 0.33) and their values during a T-LoRA run:
# - in_training: True makes FLUX-style RoPE (and other comfy_kitchen kernels without an autograd
#   formula) take their differentiable pure-torch path;
# - training_fp8_bwd: False keeps the backward of quantized (fp8) layers in the compute dtype; it
#   is left set by ComfyUI's own trainer when its quantized_backward option was used.
TRAINING_FLAGS = {"in_training": True, "training_fp8_bwd": False}
GIB = 2 ** 30
LOAD_PLAN_KEY = "tlora_train_load_plan"   # the training clone's attachment holding its LoadPlan


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


def _is_comfy_op(module: torch.nn.Module) -> bool:
    return hasattr(module, "weight_function") and hasattr(module, "bias_function")


def streams(module: torch.nn.Module) -> bool:
    """True if ComfyUI's last load of the model left ``module`` streaming (cast to the device in
    every forward) rather than resident: a resident layer is one ComfyUI loaded completely
    (``comfy_patched_weights``); before any load the answer is True, the safe side."""
    return getattr(module, "comfy_patched_weights", False) is not True


class BackwardSafe:
    """A ComfyUI weight function: the tensor a layer computes with, as autograd may keep it.

    Returns ``tensor`` itself when it is an ordinary fresh cast, else a private clone: when it is
    an inference tensor (a cached weight; trainable_model runs with inference mode off, so the
    clone is ordinary) or when the layer streams (its cast may sit in a buffer ComfyUI reuses).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_inference() or streams(self.module):
            return tensor.clone()
        return tensor


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


def _add_backward_safe_functions(patcher, dm: torch.nn.Module) -> int:
    """A :class:`BackwardSafe` weight / bias function on every comfy op of ``dm``, registered on
    ``patcher`` (applied at its loads); returns how many."""
    added = 0
    for name, module in dm.named_modules():
        if not _is_comfy_op(module):
            continue
        for attr in ("weight", "bias"):
            if isinstance(getattr(module, attr, None), torch.Tensor):
                patcher.add_weight_wrapper(f"diffusion_model.{name}.{attr}", BackwardSafe(module))
                added += 1
    return added


def _remove_backward_safe_functions(dm: torch.nn.Module) -> None:
    """Take this run's functions off the shared model's layers: whatever ComfyUI loads next (the
    MODEL the user gave, a stock LoRA on it) computes as if the run had never been."""
    for module in dm.modules():
        if _is_comfy_op(module):
            for attr in ("weight_function", "bias_function"):
                functions = getattr(module, attr)
                if any(isinstance(f, BackwardSafe) for f in functions):
                    setattr(module, attr, [f for f in functions if not isinstance(f, BackwardSafe)])


def _clone_inference_parameters(dm: torch.nn.Module, undo: _Restorer) -> int:
    """Ordinary clones of the inference parameters that no weight function reaches (modules that
    are not comfy ops: FLUX's QK-norm scales, fp8 scales); small. Put back on undo."""
    cloned = 0
    for module in dm.modules():
        skip = ("weight", "bias") if _is_comfy_op(module) else ()
        for name, param in list(module._parameters.items()):
            if name not in skip and param is not None and param.is_inference():
                module._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
                undo.push(_restore_param(module, name, param))
                cloned += 1
    return cloned


def _restore_attr(module: torch.nn.Module, attr: str, old, had_own: bool) -> Callable[[], None]:
    def restore() -> None:
        if had_own:
            setattr(module, attr, old)
        else:
            module.__dict__.pop(attr, None)
    return restore


def _restore_param(module: torch.nn.Module, name: str, param: torch.nn.Parameter) -> Callable[[], None]:
    def restore() -> None:
        module._parameters[name] = param
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
        if not (_is_comfy_op(module) and isinstance(getattr(module, "weight", None), torch.Tensor)):
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

    def weight_budget(self) -> int | None:
        """Bytes of weights allowed on the device, None without a cap."""
        if not self.max_vram_bytes:
            return None
        return max(0, self.max_vram_bytes - self.memory_required)

    def check(self) -> None:
        """Refuse a cap that the working set alone exceeds, before anything is loaded."""
        if self.max_vram_bytes and self.memory_required > self.max_vram_bytes:
            raise RuntimeError(
                f"T-LoRA Train: the run's working set alone ({self.memory_required / GIB:.2f} GiB: "
                "activations, adapters, optimizer state, offload buffers) is more than max_vram_gb "
                f"({self.max_vram_bytes / GIB:.2f} GiB), before any weight. Raise max_vram_gb, or lower "
                "the batch size, the image size or the rank.")

    def load(self, patcher) -> Residency:
        """Load ``patcher`` as planned, under inference mode as ComfyUI's nodes do (see module
        docstring), and return where its weights ended up."""
        mm = comfy.model_management
        budget = self.weight_budget()
        ask = self.memory_required
        if budget is not None:
            device = patcher.load_device
            free = mm.get_free_memory(device) + patcher.loaded_size()
            ask = max(ask, int(free - budget))
        with torch.inference_mode():
            mm.load_models_gpu([patcher], memory_required=ask, force_full_load=False)
            if budget is not None and patcher.loaded_size() > budget:
                patcher.partially_unload(patcher.offload_device,
                                         memory_to_free=patcher.loaded_size() - budget)
        return residency(patcher)

    def check_room(self, patcher) -> None:
        """After the load: refuse a run whose working set does not fit beside what ComfyUI kept
        (a GPU only; a CPU's memory is the host's)."""
        device = patcher.load_device
        if comfy.model_management.is_device_cpu(device):
            return
        free = comfy.model_management.get_free_memory(device)
        if free < self.memory_required:
            raise RuntimeError(
                f"T-LoRA Train: after loading, {free / GIB:.2f} GiB of {device} is free but the run's "
                f"working set needs {self.memory_required / GIB:.2f} GiB ({residency(patcher).describe()}). "
                "Set max_vram_gb to stream more weights, or lower the batch size, the image size or "
                "the rank.")


@contextmanager
def trainable_model(patcher, *, gradient_checkpointing: bool,
                    compute_dtype: torch.dtype | None = None, memory_required: int = 0,
                    max_vram_bytes: int = 0) -> Iterator:
    """Yield a loaded clone of ``patcher`` whose diffusion model can be backpropagated through.

    Must be entered with inference mode off and grad on (the caller's training context). The
    clone is what the caller attaches training hooks to; ``patcher`` itself is never modified.
    ``compute_dtype``: run the base in this dtype (ComfyUI casts weights per layer), None = as is.
    ``memory_required``: the run's working set beside the weights, ``max_vram_bytes``: an optional
    cap (:class:`LoadPlan`); ComfyUI unloads other models (text encoders, VAE) from the device to
    make room and streams the layers that do not fit. :func:`reload` loads the clone again the
    same way (after a validation sample loaded another clone).
    """
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        raise RuntimeError("trainable_model needs torch.inference_mode(False) and torch.enable_grad()")
    family = families.recognise(patcher.model)
    plan = LoadPlan(int(memory_required), int(max_vram_bytes))
    plan.check()
    with ExitStack() as stack:
        stack.enter_context(comfy_training_flags())
        stack.enter_context(runtime_fixes(family))
        train_patcher = _training_clone(patcher)
        if compute_dtype is not None:
            train_patcher.set_model_compute_dtype(compute_dtype)
            # The compute dtype is an object patch on the shared BaseModel: take it off again
            # (weights stay loaded; ComfyUI's next load of any clone re-checks everything).
            stack.callback(train_patcher.unpatch_model, unpatch_weights=False)
        dm = train_patcher.model.diffusion_model
        functions = _add_backward_safe_functions(train_patcher, dm)
        stack.callback(_remove_backward_safe_functions, dm)
        train_patcher.set_attachments(LOAD_PLAN_KEY, plan)
        where = plan.load(train_patcher)
        plan.check_room(train_patcher)
        train_patcher.pre_run()
        # pre_run's pair, as around ComfyUI's own sampling and training: the shared BaseModel
        # must not keep pointing at the training clone.
        stack.callback(train_patcher.cleanup)
        undo = _Restorer()
        stack.callback(undo.undo)
        _freeze_parameters(dm, undo)
        cloned = _clone_inference_parameters(dm, undo)
        checkpointing = gradient_checkpointing or where.streamed_layers > 0
        if checkpointing and not gradient_checkpointing:
            log.info("T-LoRA Train: gradient checkpointing on while weights stream")
        blocks = _install_checkpointing(dm, undo, family.checkpoint_blocks) if checkpointing else 0
        log.info("T-LoRA Train: %s; working set %.2f GiB", where.describe(), plan.memory_required / GIB)
        log.debug("trainable model: %d weight functions, %d params cloned, %d blocks checkpointed",
                  functions, cloned, blocks)
        yield train_patcher


def reload(train_patcher) -> Residency:
    """Load the training clone again as :func:`trainable_model` planned it (after another clone of
    the model was loaded, e.g. for a validation sample) and run its ``pre_run``."""
    plan = train_patcher.get_attachment(LOAD_PLAN_KEY) or LoadPlan(0)
    where = plan.load(train_patcher)
    train_patcher.pre_run()
    return where
