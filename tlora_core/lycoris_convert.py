"""Converting a LyCORIS ``tlora`` file, once, into this pack's T-LoRA format against a full-precision base.

A LyCORIS T-LoRA file lacks the frozen factors its adapter subtracts; every load rebuilds them from
the base it is applied to, so on a rounded base (fp8, int8, nvfp4, mxfp8, GGUF) the result is off
(:mod:`tlora_core.rounded_base`). Converting reads the file exactly as the T-LoRA Loader does on a
full-precision model (:func:`tlora_core.files.read.load_tlora_file`, frozen factors = top-r SVD of
the base weights) and writes what it read with :func:`tlora_core.files.write.save_tlora`, which
stores every factor: ``down = [Q; Q0]``, ``up = [s P diag(lambda) | -s P0 diag(lambda0)]``. The
converted file then gives the same adapters, bit for bit, on any base, quantized or not.

The base is read from the model file itself (``.safetensors`` in ComfyUI's naming: a diffusion
model, or a checkpoint whose model keys start with ``model.diffusion_model.``), one layer at a
time: the full-precision model never has to fit in memory, and ComfyUI is not needed. Files that
are themselves quantized (fp8 / int8 / scaled / ``comfy_quant``) are refused: converting against
a rounded base would store its error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from . import families
from .files.read import load_tlora_file
from .files.write import save_tlora

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "model.diffusion_model."
FULL_PRECISION = ("F32", "BF16", "F16", "F64")
QUANTIZATION_MARKERS = (".comfy_quant", ".scale_weight", ".weight_scale", ".weight_scale_2", "scaled_fp8")


class FileWeights(Mapping[str, torch.Tensor]):
    """``{module path: float32 weight}`` of the 2-D ``.weight`` tensors of an open safetensors file,
    read on access (``prefix``: the model keys' prefix in a checkpoint)."""

    def __init__(self, handle, prefix: str, paths: list[str]) -> None:
        self._handle, self._prefix, self._paths = handle, prefix, set(paths)

    def __getitem__(self, path: str) -> torch.Tensor:
        if path not in self._paths:
            raise KeyError(path)
        return self._handle.get_tensor(f"{self._prefix}{path}.weight").to(torch.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._paths))

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, path: object) -> bool:
        return path in self._paths


def base_inventory(handle, metadata: Mapping[str, str] | None, source: str
                   ) -> tuple[str, dict[str, tuple[int, int]]]:
    """``(prefix, {module path: (out, in)})`` of a base model file's 2-D weights; ValueError for a
    file that is not a full-precision diffusion model."""
    keys = list(handle.keys())
    prefix = CHECKPOINT_PREFIX if any(k.startswith(CHECKPOINT_PREFIX) for k in keys) else ""
    keys = [k for k in keys if k.startswith(prefix)]
    marked = [k for k in keys if k.endswith(QUANTIZATION_MARKERS)]
    if marked or "_quantization_metadata" in (metadata or {}):
        raise ValueError(f"{source} is a quantized model file (e.g. {(marked or ['its metadata'])[0]}): "
                         "convert against the full-precision file (bf16 / fp16 / fp32) it was made from.")
    inventory = {}
    for key in keys:
        if not key.endswith(".weight"):
            continue
        view = handle.get_slice(key)
        shape = view.get_shape()
        if len(shape) != 2:
            continue
        if view.get_dtype() not in FULL_PRECISION:
            raise ValueError(f"{source}: '{key}' is stored as {view.get_dtype()}, not full precision; "
                             "convert against the bf16 / fp16 / fp32 model file.")
        inventory[key[len(prefix):-len(".weight")]] = (int(shape[0]), int(shape[1]))
    if not inventory:
        raise ValueError(f"{source} holds no 2-D weights: it is not a diffusion model file.")
    return prefix, inventory


def convert_lycoris(lycoris: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, *,
                    family: str | None = None, min_rank: float | None = None,
                    power: float | None = None) -> Path:
    """Convert the LyCORIS ``tlora`` file ``lycoris`` against the full-precision ``base`` model file
    and write it to ``out`` in this pack's format; returns ``out``.

    ``family``: a family id (default: the one the base's layer names show). ``min_rank`` / ``power``:
    the rank schedule to store (LyCORIS files carry none; default: rank / 2 and 1, as the Loader
    would use, and the Loader's own inputs can still override them). Raises ValueError (or
    :class:`~tlora_core.files.check.TLoRAFileError`) when the base or the file does not fit.
    """
    lycoris, base, out = Path(lycoris), Path(base), Path(out)
    if out.resolve() == lycoris.resolve():
        raise ValueError("the converted file must not replace the LyCORIS file")
    with safe_open(str(base), framework="pt") as handle:
        prefix, inventory = base_inventory(handle, handle.metadata(), base.name)
        spec = families.get(family) if family else families.from_inventory(inventory)
        weights = load_tlora_file(lycoris, inventory, min_rank=min_rank, power=power,
                                  base_weights=FileWeights(handle, prefix, list(inventory)), family=spec)
    if weights.source_format != "lycoris":
        raise ValueError(f"{lycoris.name} is a {weights.source_format} file, not a LyCORIS T-LoRA: "
                         "it stores all its factors already and needs no conversion.")
    for warning in weights.warnings:
        log.warning("%s", warning)
    return save_tlora(out, weights, inventory=inventory, extra_metadata={
        "tlora.converted_from": lycoris.name, "tlora.converted_base": base.name})
