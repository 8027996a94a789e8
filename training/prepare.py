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
- comfy-op layers (Linear, Conv, norms) whose weight / bias is an inference tensor get a
  ``weight_function`` / ``bias_function`` that hands on an ordinary tensor: ComfyUI's cast makes a
  fresh copy per forward once a layer has a function, and a copy that is still an inference
  tensor (a cached weight) is cloned outside inference mode;
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


def _ordinary(tensor: torch.Tensor) -> torch.Tensor:
    # Runs with inference mode off (trainable_model's contract), so the clone is an ordinary tensor.
    return tensor.clone() if tensor.is_inference() else tensor


def _is_comfy_op(module: torch.nn.Module) -> bool:
    return hasattr(module, "weight_function") and hasattr(module, "bias_function")


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


def _make_backward_safe(dm: torch.nn.Module, undo: _Restorer) -> tuple[int, int]:
    """:func:`_ordinary` wrappers on comfy ops' inference weight / bias; clones of other inference
    params (small: norm scales, fp8 scales)."""
    wrapped = cloned = 0
    for module in dm.modules():
        wrappable = ()
        if _is_comfy_op(module):
            wrappable = ("weight", "bias")
            for attr, fn_attr in (("weight", "weight_function"), ("bias", "bias_function")):
                tensor = getattr(module, attr, None)
                if isinstance(tensor, torch.Tensor) and tensor.is_inference():
                    had_own = fn_attr in module.__dict__
                    old = getattr(module, fn_attr)
                    setattr(module, fn_attr, list(old) + [_ordinary])
                    undo.push(_restore_attr(module, fn_attr, old, had_own))
                    wrapped += 1
        for name, param in list(module._parameters.items()):
            if name not in wrappable and param is not None and param.is_inference():
                module._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
                undo.push(_restore_param(module, name, param))
                cloned += 1
    return wrapped, cloned


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


@contextmanager
def trainable_model(patcher, *, gradient_checkpointing: bool,
                    compute_dtype: torch.dtype | None = None, memory_required: int = 0) -> Iterator:
    """Yield a loaded clone of ``patcher`` whose diffusion model can be backpropagated through.

    Must be entered with inference mode off and grad on (the caller's training context). The
    clone is what the caller attaches training hooks to; ``patcher`` itself is never modified.
    ``compute_dtype``: run the base in this dtype (ComfyUI casts weights per layer), None = as is.
    ``memory_required``: bytes the trainer will need beside the weights; ComfyUI unloads other
    models (text encoders, VAE) from the device to make room, as it does before sampling.
    """
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        raise RuntimeError("trainable_model needs torch.inference_mode(False) and torch.enable_grad()")
    family = families.recognise(patcher.model)
    with ExitStack() as stack:
        stack.enter_context(comfy_training_flags())
        stack.enter_context(runtime_fixes(family))
        train_patcher = _training_clone(patcher)
        if compute_dtype is not None:
            train_patcher.set_model_compute_dtype(compute_dtype)
            # The compute dtype is an object patch on the shared BaseModel: take it off again
            # (weights stay loaded; ComfyUI's next load of any clone re-checks everything).
            stack.callback(train_patcher.unpatch_model, unpatch_weights=False)
        comfy.model_management.load_models_gpu([train_patcher], memory_required=memory_required,
                                               force_full_load=True)
        train_patcher.pre_run()
        # pre_run's pair, as around ComfyUI's own sampling and training: the shared BaseModel
        # must not keep pointing at the training clone.
        stack.callback(train_patcher.cleanup)
        dm = train_patcher.model.diffusion_model
        undo = _Restorer()
        stack.callback(undo.undo)
        _freeze_parameters(dm, undo)
        wrapped, cloned = _make_backward_safe(dm, undo)
        blocks = _install_checkpointing(dm, undo, family.checkpoint_blocks) if gradient_checkpointing else 0
        log.debug("trainable model: %d inference weights wrapped, %d params cloned, %d blocks "
                  "checkpointed", wrapped, cloned, blocks)
        yield train_patcher
