"""A model's base weights as full-precision matrices, whatever the layer stores, and how they are stored.

ComfyUI bases reach the pack in several storages: plain float tensors (fp32 / bf16 / fp16, classic
fp8 from ``weight_dtype``), ComfyUI's mixed-precision ``QuantizedTensor`` weights (fp8 scaled, int8,
nvfp4, mxfp8), 0.3.75's legacy scaled-fp8 Linear (fp8 weight times ``scale_weight``) and
ComfyUI-GGUF's ``GGMLTensor`` (packed GGML blocks). Everything here is duck-typed, pure torch, and
never imports ComfyUI:

- :func:`parameter_value`: the float32 value a layer computes with: a GGUF layer's own
  ``get_weight(tensor, dtype)`` on the tensor *without* the LoRA patches ComfyUI-GGUF hangs on it
  (``.patches``: a stock LoRA is not the base); else the layer's ``convert_<name>`` (what ComfyUI's
  own LoRA code calls to read a weight: dequantize, apply ``scale_weight``); then
  ``.dequantize()`` of a quantized tensor; then an up-cast.
- :func:`storage_of`: a :class:`Storage`, naming the storage and, where it is known, a model of its
  rounding step (:meth:`Storage.step`: the spacing of representable values around each weight).
- :class:`BaseWeights`: a lazy ``{module path: float32 weight}`` mapping over a model's layers
  (a layer is dequantized when asked and not kept: a real base holds billions of weights), with
  :meth:`BaseWeights.storage`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

HIGH_PRECISION = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
GGUF_FLOAT_TYPES = ("F64", "F32", "F16", "BF16")
# Bits of a GGML block type's codes where the name does not say (the rest: Q<bits>_*, IQ<bits>_*).
GGUF_BITS = {"TQ1_0": 2, "TQ2_0": 2}


def _without_patches(tensor: torch.Tensor) -> torch.Tensor:
    """An alias of a GGUF tensor (same storage and attributes) whose ``patches`` list is empty, so
    dequantizing it gives the base weight; the tensor itself is left untouched."""
    alias = tensor.as_subclass(type(tensor))
    alias.__dict__.update(tensor.__dict__)
    alias.patches = []
    return alias


def _is_gguf(module: torch.nn.Module, tensor: torch.Tensor) -> bool:
    return callable(getattr(module, "get_weight", None)) and hasattr(tensor, "tensor_type")


def parameter_value(module: torch.nn.Module, name: str = "weight",
                    tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 value of ``module``'s parameter ``name`` (or of ``tensor``, a stored copy of it,
    e.g. ComfyUI's backup of a weight a stock LoRA was merged into) as the layer computes with it."""
    if tensor is None:
        tensor = getattr(module, name)
    with torch.no_grad():   # a loaded weight may require grad; its value never does
        if _is_gguf(module, tensor):
            value = module.get_weight(_without_patches(tensor), torch.float32)
        else:
            convert = getattr(module, f"convert_{name}", None)
            value = convert(tensor, inplace=False) if callable(convert) else tensor
        value = value.detach()   # a plain tensor, unless it is a quantized tensor subclass
        if type(value) is not torch.Tensor and callable(getattr(value, "dequantize", None)):
            value = value.dequantize()
        return value.to(torch.float32)


@dataclass(frozen=True)
class Grid:
    """How a storage rounds: ``kind`` "float" (``bits`` mantissa bits: spacing ``2**(e - bits)`` at
    exponent ``e``, never below the subnormal spacing ``floor``, in absolute units or, with
    ``scaled``, times the block's largest magnitude) or "uniform" (codes ``0 .. 2**bits - 1`` evenly
    spread over each block's [min, max]); ``block`` consecutive values along a row share a scale
    (None: the whole tensor)."""

    kind: str
    bits: int
    block: int | None = None
    floor: float = 0.0
    scaled: bool = True


@dataclass(frozen=True)
class Storage:
    """How a layer's weight is stored: ``label`` for messages; ``rounded`` when it holds fewer than 16
    bits per weight; ``grid`` the model of its rounding, or None where the pack has none."""

    label: str
    rounded: bool
    grid: Grid | None = None

    def step(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The modelled rounding step (spacing of representable values) around each value of the
        float32 ``weight`` (this storage's dequantized values), same shape; None without a grid."""
        return None if self.grid is None else _grid_step(self.grid, weight)


def _blocks(weight: torch.Tensor, block: int | None) -> torch.Tensor:
    if block is None:
        return weight.reshape(1, -1)
    rows = weight.reshape(-1, weight.shape[-1])
    pad = (-rows.shape[-1]) % block
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(-1, block)


def _grid_step(grid: Grid, weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().float()
    blocks = _blocks(w, grid.block)
    if grid.kind == "uniform":
        span = (blocks.amax(dim=1, keepdim=True) - blocks.amin(dim=1, keepdim=True)) / (2 ** grid.bits - 1)
        step = span.expand_as(blocks)
    else:
        exponent = torch.floor(torch.log2(blocks.abs().clamp(min=torch.finfo(torch.float32).tiny)))
        floor = grid.floor * blocks.abs().amax(dim=1, keepdim=True) if grid.scaled \
            else torch.tensor(grid.floor)
        step = torch.maximum(torch.exp2(exponent - grid.bits), floor)
        step = torch.where(blocks == 0, floor, step)
    if grid.block is None:
        return step.reshape(w.shape)
    cols = w.shape[-1]
    return step.reshape(-1, (cols + (-cols) % grid.block))[:, :cols].reshape(w.shape)


def _float_grid(dtype: torch.dtype, scaled: bool, block: int | None = None) -> Grid:
    """A float format's grid: mantissa bits from its epsilon; the subnormal spacing as the floor,
    relative to the block's largest value when a scale maps that value onto the format's maximum."""
    info = torch.finfo(dtype)
    bits = round(-torch.log2(torch.tensor(info.eps)).item())
    subnormal = info.smallest_normal * info.eps
    return Grid("float", bits, block, subnormal / info.max if scaled else subnormal, scaled)


def _gguf_storage(type_name: str) -> Storage:
    if type_name in GGUF_FLOAT_TYPES:
        return Storage(f"GGUF {type_name}", rounded=False)
    match = re.match(r"I?Q(\d)", type_name)
    bits = GGUF_BITS.get(type_name) or (int(match.group(1)) if match else None)
    if bits is None:
        return Storage(f"GGUF {type_name}", rounded=True)
    # K-quants scale sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 32 values; the legacy types blocks of 32.
    block = 16 if type_name in ("Q2_K", "Q3_K", "Q6_K") else 32
    return Storage(f"GGUF {type_name}", rounded=True, grid=Grid("uniform", bits, block))


# Mixed-precision formats by a name fragment of ComfyUI's quant_format / layout class (lower case).
_QUANTIZED: tuple[tuple[str, Callable[[], Grid | None]], ...] = (
    ("nvfp4", lambda: Grid("float", 1, 16, 0.5 / 6)),      # e2m1 codes 0..6, a scale per 16 values
    ("mxfp8", lambda: _float_grid(torch.float8_e4m3fn, True, 32)),
    ("e5m2", lambda: _float_grid(torch.float8_e5m2, True)),
    ("fp8", lambda: _float_grid(torch.float8_e4m3fn, True)),
    ("float8", lambda: _float_grid(torch.float8_e4m3fn, True)),
    ("int8", lambda: Grid("uniform", 8)),
    ("w4", lambda: Grid("uniform", 4, 16)),
    ("int4", lambda: Grid("uniform", 4, 16)),
)


def _quantized_label(module: torch.nn.Module, tensor: torch.Tensor) -> str:
    for owner, attr in ((module, "quant_format"), (tensor, "_layout_cls"), (tensor, "_layout_type"),
                        (module, "layout_type")):
        value = getattr(owner, attr, None)
        if value is not None:
            return getattr(value, "__name__", str(value))
    return type(tensor).__name__


def storage_of(module: torch.nn.Module, tensor: torch.Tensor | None = None) -> Storage:
    """How ``module``'s weight (or ``tensor``, a stored copy of it) is stored (see :class:`Storage`)."""
    if tensor is None:
        tensor = module.weight
    if _is_gguf(module, tensor):
        kind = tensor.tensor_type
        return _gguf_storage(getattr(kind, "name", str(kind)))
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and callable(getattr(tensor, "dequantize", None)):
        label = _quantized_label(module, tensor)
        key = label.lower()
        if "e5m2" in key and "fp8" not in key and "float8" not in key:
            key += " fp8"
        grid = next((make() for fragment, make in _QUANTIZED if fragment in key), None)
        return Storage(f"{label} (ComfyUI quantized)", rounded=True, grid=grid)
    dtype = tensor.dtype
    if dtype in HIGH_PRECISION:
        return Storage(str(dtype).removeprefix("torch."), rounded=False)
    if dtype.is_floating_point:
        name = str(dtype).removeprefix("torch.")
        if getattr(module, "scale_weight", None) is not None:
            return Storage(f"{name} scaled (scale_weight)", rounded=True, grid=_float_grid(dtype, True))
        return Storage(f"{name} (classic fp8, unscaled)", rounded=True, grid=_float_grid(dtype, False))
    return Storage(str(dtype).removeprefix("torch."), rounded=True)


class BaseWeights(Mapping[str, torch.Tensor]):
    """``{module path: float32 weight}`` of a model's Linear layers, dequantized on each access.

    ``layers`` maps each path to ``(module, stored weight)``: the stored weight is the module's own or
    a backup of it taken before ComfyUI merged patches into it. Nothing is kept: a reader holds one
    layer's float32 copy at a time, never the whole model's (a float32 weight is the parameter
    itself, no copy).
    """

    def __init__(self, layers: Mapping[str, tuple[torch.nn.Module, torch.Tensor]]) -> None:
        self._layers = dict(layers)

    def __getitem__(self, name: str) -> torch.Tensor:
        module, tensor = self._layers[name]
        return parameter_value(module, "weight", tensor)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __contains__(self, name: object) -> bool:
        return name in self._layers

    def storage(self, name: str) -> Storage:
        module, tensor = self._layers[name]
        return storage_of(module, tensor)
