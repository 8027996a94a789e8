"""The frozen layers' weights as autograd sees them during a T-LoRA run, without copying them.

A MODEL made by a ComfyUI node has *inference tensors* as weights, and autograd refuses to keep an
inference tensor for backward (a Linear keeps its weight to compute the gradient of its input).
Per layer, after each load of the training clone:

- a **resident layer holding plain tensors** (float or classic fp8 Parameters on the device)
  computes with a zero-copy *ordinary alias* of each inference parameter (:func:`ordinary_alias`:
  a new tensor on the same storage, made outside inference mode), swapped into the module for the
  training steps (:class:`ResidentAliases`) and taken out again before anything else of ComfyUI
  runs (a validation sample, the end of the run). No copy, no memory: the base weights are frozen,
  nothing writes them during a step. Its ComfyUI weight functions are taken off, since any function
  makes ComfyUI copy the weight in every forward;
- every other layer keeps a :class:`BackwardSafe` weight / bias function, registered with
  ComfyUI's ``add_weight_wrapper`` (re-applied by each load): a **streamed** layer (ComfyUI casts
  it to the device in every forward, possibly into a buffer it reuses for the next layers: AMD,
  ``--disable-cuda-malloc``; autograd would then replay backward with another layer's weight) gets
  a private clone of its cast; a layer of ComfyUI's quantized layouts (``QuantizedTensor``) gets its
  fresh dequantized weight, cloned only if it is still an inference tensor (a cached copy). A GGUF
  layer runs its own cast, which ignores weight functions; it needs none: it dequantizes into a
  new tensor in every forward.
"""

from __future__ import annotations

import torch

PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_comfy_op(module: torch.nn.Module) -> bool:
    """A ComfyUI op (Linear, Conv, norms, ...: its weight goes through ComfyUI's cast)."""
    return hasattr(module, "weight_function") and hasattr(module, "bias_function")


def streams(module: torch.nn.Module) -> bool:
    """True if ComfyUI's last load of the model left ``module`` streaming (cast to the device in
    every forward) rather than resident: a resident layer is one ComfyUI loaded completely
    (``comfy_patched_weights``); before any load the answer is True, the safe side."""
    return getattr(module, "comfy_patched_weights", False) is not True


class BackwardSafe:
    """A ComfyUI weight function: the tensor a layer computes with, as autograd may keep it.

    Returns ``tensor`` itself when it is an ordinary fresh cast, else a private clone: when it is
    an inference tensor (a cached weight; training runs with inference mode off, so the clone is
    ordinary) or when the layer streams (its cast may sit in a buffer ComfyUI reuses).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if torch.is_inference_mode_enabled():
            return tensor   # no autograd: a sample, not a training step
        if not (tensor.is_inference() or streams(self.module)):
            return tensor
        copy = tensor.clone()
        if copy.is_cuda:
            # ComfyUI 0.3.75 runs weight functions on its offload stream: tell the allocator the
            # compute stream's backward uses the copy too, or a later cast could reuse its memory.
            compute = torch.cuda.default_stream(copy.device)
            if torch.cuda.current_stream(copy.device) != compute:
                copy.record_stream(compute)
        return copy


def add_backward_safe_functions(patcher, dm: torch.nn.Module) -> int:
    """A :class:`BackwardSafe` weight / bias function on every comfy op of ``dm``, registered on
    ``patcher`` (applied at each of its loads); returns how many."""
    added = 0
    for name, module in dm.named_modules():
        if not is_comfy_op(module):
            continue
        for attr in ("weight", "bias"):
            if isinstance(getattr(module, attr, None), torch.Tensor):
                patcher.add_weight_wrapper(f"diffusion_model.{name}.{attr}", BackwardSafe(module))
                added += 1
    return added


def _without_backward_safe(module: torch.nn.Module) -> list[tuple[str, list]]:
    """Take the :class:`BackwardSafe` functions off ``module``; returns ``(attribute, old list)``
    for each list changed."""
    changed = []
    for attr in ("weight_function", "bias_function"):
        functions = getattr(module, attr)
        if any(isinstance(f, BackwardSafe) for f in functions):
            changed.append((attr, functions))
            setattr(module, attr, [f for f in functions if not isinstance(f, BackwardSafe)])
    return changed


def remove_backward_safe_functions(dm: torch.nn.Module) -> None:
    """Take the run's functions off the shared model's layers: whatever ComfyUI loads next (the
    MODEL the user gave, a stock LoRA on it) computes as if the run had never been."""
    for module in dm.modules():
        if is_comfy_op(module):
            _without_backward_safe(module)


def ordinary_alias(tensor: torch.Tensor) -> torch.Tensor:
    """An ordinary (non-inference) tensor viewing ``tensor``'s storage: no copy. Call it with
    inference mode off."""
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def _aliasable(module: torch.nn.Module, compute_dtype: torch.dtype | None) -> bool:
    """Every parameter of ``module`` is a plain tensor (no quantized or GGUF wrapper) and, for a
    comfy op, it is resident and either casts its weight anyway (a manual-cast layer) or holds it
    in the dtype it computes in (otherwise its weight function makes ComfyUI cast it)."""
    params = [p for p in module._parameters.values() if p is not None]
    if not params or any(type(p) not in PLAIN for p in params):
        return False
    if not is_comfy_op(module):
        return True
    weight = module._parameters.get("weight")
    casts = getattr(module, "comfy_cast_weights", False)
    return not streams(module) and (casts or compute_dtype is None or weight is None
                                    or weight.dtype == compute_dtype)


class ResidentAliases:
    """The swap of :func:`ordinary_alias` es into the resident plain layers, and back.

    :meth:`apply` after each load of the training clone (with inference mode off): each such
    layer's inference parameters become ordinary aliases and, for a comfy op, its
    :class:`BackwardSafe` functions come off. :meth:`restore` puts the very Parameter objects back
    wherever the module still holds the alias, and the functions it took off. Modules that are not comfy ops (FLUX's QK-norm scales) are
    aliased too, and so are a layer's parameters beside its weight and bias (scales) wherever the
    weight and bias keep their functions.
    """

    def __init__(self, base_model: torch.nn.Module) -> None:
        self.base_model = base_model      # ComfyUI's BaseModel (its diffusion_model is aliased)
        self._swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter, torch.nn.Parameter]] = []
        self._stripped: list[tuple[torch.nn.Module, str, list]] = []

    def apply(self) -> int:
        """Swap the aliases in; returns how many layers now compute with no copy."""
        self.restore()
        # The dtype the layers compute in as loaded (the training_dtype's object patch, or a
        # manual-cast model's), None: their weights'.
        compute = getattr(self.base_model, "manual_cast_dtype", None)
        layers = 0
        for module in self.base_model.diffusion_model.modules():
            whole = _aliasable(module, compute)
            if whole:
                layers += 1
                if is_comfy_op(module):
                    self._stripped.extend((module, attr, old) for attr, old in _without_backward_safe(module))
            for name, param in list(module._parameters.items()):
                # A layer that keeps its functions still gets its other plain parameters aliased
                # (0.3.75's scaled-fp8 Linear multiplies the input by its scale_input / scale_weight).
                if not whole and (name in ("weight", "bias") or type(param) not in PLAIN):
                    continue
                if param is not None and param.is_inference():
                    alias = torch.nn.Parameter(ordinary_alias(param), requires_grad=False)
                    module._parameters[name] = alias
                    self._swapped.append((module, name, param, alias))
        return layers

    def restore(self) -> None:
        """Put the original Parameters and the functions taken off back (newest first): the
        layers are as ComfyUI's load left them, whatever ComfyUI does with them next."""
        while self._swapped:
            module, name, original, alias = self._swapped.pop()
            if module._parameters.get(name) is alias:
                module._parameters[name] = original
        while self._stripped:
            module, attr, functions = self._stripped.pop()
            current = getattr(module, attr)
            setattr(module, attr, [*current, *(f for f in functions if isinstance(f, BackwardSafe)
                                               and f not in current)])
