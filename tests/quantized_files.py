"""Writing a float diffusion model's state dict as the quantized checkpoint files users download.

Every writer takes ``sd`` (the float32 state dict of a ComfyUI diffusion model, keys as ComfyUI
names them inside it: ``double_blocks.0.img_attn.qkv.weight``) and ``linears`` (the module paths of
the Linear layers to quantize) and writes one file. The files follow the formats ComfyUI's loaders
read (``comfy/utils.py`` ``convert_old_quants``, ``comfy/ops.py`` ``_load_quantized_module`` in
0.33; ``comfy/model_detection.py`` and ``mixed_precision_ops`` in 0.3.75; ComfyUI-GGUF's
``loader.py``):

- ComfyUI mixed precision: per quantized layer ``<layer>.weight`` in the storage dtype plus its
  scales, and the layer's format declared in one of three spellings: the safetensors header
  ``_quantization_metadata`` (``{"format_version": "1.0", "layers": {layer: {"format": ...}}}``),
  a ``<layer>.comfy_quant`` uint8 tensor of that JSON, or the legacy ``scaled_fp8`` marker with
  ``<layer>.scale_weight`` (fp8 e4m3fn only).
- fp8 (e4m3fn / e5m2) and int8 tensorwise are written here (``scale = amax / max code``,
  round to nearest); nvfp4 and mxfp8 through ComfyUI's own quantizers (``comfy.quant_ops``: packed
  4-bit values and swizzled block scales are theirs to define).
- GGUF: ``general.architecture`` and each tensor in a GGML type; Q8_0, Q4_0 and BF16 blocks by
  gguf-py, Q4_K blocks by :func:`q4_k_blocks` (gguf-py cannot quantize K-quants). Only 2-D
  Linear weights are quantized; the rest stays F32, as the usual converters keep small tensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
QK_K = 256          # values per K-quant super-block
Q4_K_SUB = 32       # values per Q4_K sub-block (8 per super-block, each with a 6-bit scale and min)


def fp8_scaled(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q * scale`` the stored weight: per-tensor ``scale = amax / fp8 max``."""
    dtype = FP8[fmt]
    top = torch.finfo(dtype).max
    scale = (weight.abs().amax().float() / top).clamp(min=torch.finfo(torch.float32).tiny)
    return (weight.float() / scale).clamp(-top, top).to(dtype), scale.reshape(())


def int8_tensorwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: symmetric int8 codes -127..127, ``scale = amax / 127``."""
    scale = (weight.abs().amax().float() / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(weight.float() / scale).clamp(-127, 127).to(torch.int8), scale.reshape(())


def _comfy_quant(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def _comfy_quantized(weight: torch.Tensor, layout: str, prefix: str) -> dict[str, torch.Tensor]:
    """``<prefix>weight`` and its scales as ComfyUI's quantizer (0.33+) stores them."""
    from comfy.quant_ops import QuantizedTensor

    return QuantizedTensor.from_float(weight.float().contiguous(), layout).state_dict(f"{prefix}weight")


def write_mixed_precision(sd: dict[str, torch.Tensor], linears: Iterable[str], fmt: str, spelling: str,
                          path: Path) -> None:
    """A ComfyUI mixed-precision file: ``fmt`` one of float8_e4m3fn, float8_e5m2, int8_tensorwise,
    nvfp4, mxfp8; ``spelling`` ``"header"`` (``_quantization_metadata``), ``"keys"``
    (``.comfy_quant`` tensors) or ``"legacy"`` (``scaled_fp8`` + ``.scale_weight``, e4m3fn only)."""
    if spelling == "legacy" and fmt != "float8_e4m3fn":
        raise ValueError("the legacy scaled_fp8 spelling stores float8_e4m3fn only")
    out = dict(sd)
    layers: dict[str, dict] = {}
    for layer in linears:
        prefix = f"{layer}."
        weight = out.pop(f"{prefix}weight")
        if fmt in FP8:
            q, scale = fp8_scaled(weight, fmt)
            out[f"{prefix}weight"] = q
            out[f"{prefix}{'scale_weight' if spelling == 'legacy' else 'weight_scale'}"] = scale
        elif fmt == "int8_tensorwise":
            q, scale = int8_tensorwise(weight)
            out[f"{prefix}weight"], out[f"{prefix}weight_scale"] = q, scale
        elif fmt == "nvfp4":
            out.update(_comfy_quantized(weight, "TensorCoreNVFP4Layout", prefix))
        elif fmt == "mxfp8":
            out.update(_comfy_quantized(weight, "TensorCoreMXFP8Layout", prefix))
        else:
            raise ValueError(f"unknown quantization format {fmt!r}")
        layers[layer] = {"format": fmt}
        if spelling == "keys":
            out[f"{prefix}comfy_quant"] = _comfy_quant(layers[layer])
    metadata = None
    if spelling == "header":
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    elif spelling == "legacy":
        # An empty marker, as ComfyUI's own save writes it: its dtype names the fp8 format.
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata=metadata)


def write_float(sd: dict[str, torch.Tensor], path: Path) -> None:
    """The full-precision file (what Load Diffusion Model rounds to fp8 with ``weight_dtype``)."""
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def q4_k_blocks(rows: np.ndarray) -> np.ndarray:
    """GGML Q4_K blocks of a float matrix whose rows are a multiple of 256 long: ``(rows, bytes)`` uint8.

    Per 256 values: f16 ``d`` and ``dmin``, 12 bytes packing eight 6-bit scales ``sc`` and mins
    ``m`` (one per 32 values), 128 bytes of 4-bit codes ``q``; a value is ``d*sc*q - dmin*m``. Each
    sub-block's range [min(x, 0), max(x)] maps onto codes 0..15 (round to nearest): a plain, valid
    quantizer (llama.cpp's searches its scales; the dequantized weights, not their quality, matter
    to the tests).
    """
    x = rows.astype(np.float32).reshape(-1, 8, Q4_K_SUB)
    lo = np.minimum(x.min(axis=-1), 0.0)
    step = (x.max(axis=-1) - lo) / 15.0
    d = (step.max(axis=-1) / 63.0).astype(np.float16)
    dmin = (-lo.min(axis=-1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.where(d32 > 0, np.rint(step / np.where(d32 > 0, d32, 1)), 0).clip(0, 63).astype(np.uint8)
    m = np.where(dmin32 > 0, np.rint(-lo / np.where(dmin32 > 0, dmin32, 1)), 0).clip(0, 63).astype(np.uint8)
    scale = d32 * sc
    offset = (dmin32 * m)[..., None]
    q = np.where(scale[..., None] > 0, np.rint((x + offset) / np.where(scale > 0, scale, 1)[..., None]), 0)
    q = q.clip(0, 15).astype(np.uint8)                                       # (blocks, 8, 32)
    packed = np.empty((x.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)                  # pairs of sub-blocks
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8),
                             packed, qs], axis=1)
    return blocks.reshape(rows.shape[0], -1)


def gguf_type_for(qtype: str, shape: tuple[int, ...]) -> str:
    """The GGML type a 2-D Linear weight of ``shape`` is stored in for the file type ``qtype``: the
    type itself where its blocks fit the rows, else Q8_0 (rows of 32), else F32."""
    block = {"Q8_0": 32, "Q4_0": 32, "Q4_K": QK_K, "BF16": 1}[qtype]
    if shape[-1] % block == 0:
        return qtype
    return "Q8_0" if shape[-1] % 32 == 0 else "F32"


def write_gguf(sd: dict[str, torch.Tensor], linears: Iterable[str], qtype: str, arch: str,
               path: Path) -> dict[str, str]:
    """A GGUF diffusion model as ComfyUI-GGUF's UnetLoaderGGUF reads it; returns the GGML type of
    every quantized Linear weight (``qtype`` or the fallback of :func:`gguf_type_for`)."""
    import gguf

    weights = {f"{layer}.weight" for layer in linears}
    writer = gguf.GGUFWriter(str(path), arch)
    types: dict[str, str] = {}
    for key, tensor in sd.items():
        data = tensor.detach().float().contiguous().numpy()
        name = gguf_type_for(qtype, data.shape) if key in weights and data.ndim == 2 else "F32"
        ggml = gguf.GGMLQuantizationType[name]
        if name == "F32":
            writer.add_tensor(key, data)
        else:
            blocks = q4_k_blocks(data) if name == "Q4_K" else gguf.quants.quantize(data, ggml)
            writer.add_tensor(key, blocks, raw_dtype=ggml)   # byte rows: the writer derives the shape
            types[key[:-len(".weight")]] = name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types
