"""A diffusion model's Linear layers by name: what readers, checks and target rules work on.

An *inventory* is ``{module path: (out_features, in_features)}`` for the Linear layers of a ComfyUI
diffusion model, paths as ComfyUI names them inside it, without the ``diffusion_model.`` prefix
(LDM names for SDXL such as ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, BFL names for
FLUX such as ``double_blocks.0.img_attn.qkv``). A :class:`Target` is where an adapter trained on a
named layer writes: a module path and, for fused layers, the rows of its output that belong to
the named projection (FLUX ``img_attn.qkv`` rows ``[q | k | v]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

Inventory = Mapping[str, tuple[int, int]]


class UnsupportedLayer(ValueError):
    """A Linear-like layer whose weight the pack cannot read as an (out, in) matrix."""


def linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """``(out_features, in_features)`` if ``module`` is a Linear-like layer, else None.

    Linear-like is what a layer *is*, not its class: a ``torch.nn.Linear`` (ComfyUI's ops, classic
    fp8, ComfyUI-GGUF's layers) or any module declaring ``in_features`` / ``out_features`` (ComfyUI's
    ``MixedPrecisionOps.Linear`` is a plain ``torch.nn.Module``), whose ``weight`` has the logical
    2-D shape ``(out_features, in_features)``. Quantized weights report their logical shape
    (ComfyUI's ``QuantizedTensor``, ComfyUI-GGUF's ``GGMLTensor`` whose storage is packed bytes).

    Raises :class:`UnsupportedLayer`, naming the class, for a layer that declares the features but
    whose weight has another shape (e.g. a packed 4-bit weight that hides its logical shape).
    """
    features = (getattr(module, "out_features", None), getattr(module, "in_features", None))
    if not (isinstance(module, torch.nn.Linear) or all(isinstance(f, int) for f in features)):
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None   # not materialised (e.g. a GGUF layer before its state dict is loaded)
    shape = tuple(int(d) for d in weight.shape)
    if len(shape) != 2 or (all(isinstance(f, int) for f in features) and shape != tuple(features)):
        raise UnsupportedLayer(
            f"{type(module).__module__}.{type(module).__qualname__} declares {features[1]} inputs and "
            f"{features[0]} outputs but its weight has shape {list(shape)} "
            f"({type(weight).__name__}, {weight.dtype}); the pack reads Linear layers whose weight "
            "is an (out, in) matrix, plain or quantized by ComfyUI or ComfyUI-GGUF")
    return shape


def linear_modules(diffusion_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``{path: module}`` of every Linear-like layer (:func:`linear_shape`) in ``diffusion_model``.

    Raises :class:`UnsupportedLayer` naming the path and class of a layer the pack cannot read.
    """
    out = {}
    for name, module in diffusion_model.named_modules():
        try:
            shape = linear_shape(module)
        except UnsupportedLayer as err:
            raise UnsupportedLayer(f"layer '{name}': {err}") from None
        if shape is not None:
            out[name] = module
    return out


def inventory_from_module(diffusion_model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{path: (out_features, in_features)}`` of every Linear-like layer (:func:`linear_shape`)
    in ``diffusion_model``: plain, classic fp8, ComfyUI-quantized or GGUF.

    Works on models built on torch's ``meta`` device (shapes without memory).
    """
    return {name: linear_shape(module) for name, module in linear_modules(diffusion_model).items()}


@dataclass(frozen=True)
class Target:
    """Where an adapter writes: ``module``'s output rows ``out_rows`` (None: all rows).

    ``swap_halves``: the module's output is the named layer's with its two halves swapped
    (FLUX ``final_layer.adaLN_modulation.1`` is diffusers' ``norm_out.linear`` as [scale | shift]).
    """

    module: str
    out_rows: tuple[int, int] | None = None
    swap_halves: bool = False
