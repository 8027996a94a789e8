"""Writing the T-LoRA file.

Our file is an ordinary kohya-style LoRA that every stock loader reads: per adapted module
``lora_unet_<path>.lora_down.weight`` (k, in), ``.lora_up.weight`` (out, k) and ``.alpha`` = k, so
the stock scale alpha / k is 1 and the stock merge adds exactly ``up @ down``: the T-LoRA delta at
full rank (t = 0, every mask column on). Ortho-LoRA (paper Eq. 8) is stored as
``up = [B S | -B_init S_init]``, ``down = [A; A_init]``; several adapters on one fused module (FLUX
qkv / linear1) as one block-diagonal pair whose rows outside every adapter are zero. The rank
schedule (paper Eq. 6, with the reference code's exponent) and the column grouping the mask needs
live in string metadata (see :mod:`.layout`). Reading it back: :mod:`.read`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import families
from ..adapter import VARIANTS, LowRankAdapter
from ..inventory import Inventory
from ..weights import TLoRAWeights
from .atomic import atomic_write
from .check import check_finite
from .layout import (
    HEADER_KEYS,
    MASKED_VARIANTS,
    UNMASKED_VARIANTS,
    Block,
    Header,
    canonical_blocks,
    encode_blocks,
    encode_header,
    module_key,
)

log = logging.getLogger(__name__)

SAVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _file_header(weights: TLoRAWeights) -> Header:
    if weights.variant not in VARIANTS:
        raise ValueError(f"unknown variant {weights.variant!r} (known: {', '.join(VARIANTS)})")
    if weights.architecture not in families.ids():
        raise ValueError(f"cannot save for architecture {weights.architecture!r} "
                         f"(known: {', '.join(families.ids())})")
    adapters = [a for group in weights.adapters.values() for a in group]
    if not adapters:
        raise ValueError("there are no adapters to save")
    schedule = weights.schedule
    if weights.variant in MASKED_VARIANTS and schedule is None:
        raise ValueError(f"variant '{weights.variant}' needs a rank schedule (weights.schedule is None)")
    if weights.variant in UNMASKED_VARIANTS and schedule is not None:
        raise ValueError(f"variant '{weights.variant}' has no rank schedule; use 'tlora' for Ortho + mask")
    parts = Counter(a.parts for a in adapters).most_common(1)[0][0]
    rank = schedule.rank if schedule is not None else \
        Counter(a.columns // a.parts for a in adapters).most_common(1)[0][0]
    return Header(weights.variant, weights.architecture, rank, parts, schedule)


def _out_features(module: str, group: list[LowRankAdapter], inventory: Inventory | None) -> int:
    if inventory is not None:
        if module not in inventory:
            raise ValueError(f"'{module}' is not a Linear layer of the model given as inventory")
        return inventory[module][0]
    full = {a.up.shape[0] for a in group if a.out_rows is None}
    if len(full) == 1:
        return full.pop()
    if full:
        raise ValueError(f"layer '{module}': adapters disagree on its output size {sorted(full)}")
    raise ValueError(f"layer '{module}': every adapter writes only some output rows "
                     f"({[a.out_rows for a in group]}); pass inventory= so that the stored pair "
                     "covers the whole layer")


def _stored_pair(module: str, group: list[LowRankAdapter], out_features: int,
                 in_features: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One (down, up) pair whose product is the sum of the group's full-rank deltas."""
    in_features = group[0].in_features if in_features is None else in_features
    for a in group:
        rows = a.out_rows or (0, out_features)
        if a.in_features != in_features or rows[1] - rows[0] != a.up.shape[0] \
                or not 0 <= rows[0] < rows[1] <= out_features:
            raise ValueError(f"layer '{module}' (out={out_features}, in={in_features}): an adapter "
                             f"with down {tuple(a.down.shape)}, up {tuple(a.up.shape)} on rows "
                             f"{a.out_rows} does not fit")
    down = torch.cat([a.down.detach().to("cpu", torch.float32) for a in group])
    up = torch.zeros(out_features, down.shape[0])
    col = 0
    for a in group:
        rows = slice(None) if a.out_rows is None else slice(*a.out_rows)
        up[rows, col:col + a.columns] = a.up.detach().to("cpu", torch.float32)
        col += a.columns
    return down, up


def _standard_metadata(path: Path, header: Header, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    # kohya tools read ss_network_alpha / ss_network_dim as the scale; every module's alpha equals
    # its own column count, so report the most common one for both (scale 1).
    dims = Counter(int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight"))
    dim = str(dims.most_common(1)[0][0])
    s = header.schedule
    schedule = "no rank schedule" if s is None else \
        f"rank {s.rank}, min_rank {s.min_rank}, power {s.power:g}, T {s.T}"
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": path.stem,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": dim,
        "ss_training_comment": (
            f"T-LoRA ({header.variant}, {schedule}). Stock LoRA loaders apply it as a plain LoRA at "
            "full rank (t = 0); a T-LoRA loader applies the timestep-dependent rank mask."),
        **families.get(header.architecture).file_labels,
    }


def _merge_extra(metadata: dict[str, str], extra: Mapping[str, str] | None) -> dict[str, str]:
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must map strings to strings, got {key!r}: {type(value).__name__}")
        if key in HEADER_KEYS:
            raise ValueError(f"metadata key '{key}' is written by save_tlora itself")
        if key == "tlora.training":
            try:
                json.loads(value)
            except ValueError as err:
                raise ValueError(f"'tlora.training' must be a JSON string ({err})") from err
        metadata[key] = value
    if "tlora.trigger" in metadata:
        metadata.setdefault("modelspec.trigger_phrase", metadata["tlora.trigger"])
    return metadata


def save_tlora(path: str | os.PathLike, weights: TLoRAWeights, *,
               extra_metadata: Mapping[str, str] | None = None, dtype: torch.dtype = torch.float32,
               inventory: Inventory | None = None) -> Path:
    """Write ``weights`` as a T-LoRA file that stock LoRA loaders also read (see module docstring).

    Args:
        path: target file (``.safetensors``); replaced atomically.
        weights: adapters keyed by ComfyUI module path (no ``diffusion_model.`` prefix).
        extra_metadata: more string metadata, e.g. ``tlora.trigger``, ``tlora.prompt``,
            ``tlora.training`` (a JSON string), ``modelspec.title``. The ``tlora.*`` header keys
            are written from ``weights`` and cannot be overridden.
        dtype: tensor dtype in the file: float32 (default, exact), bfloat16 or float16.
        inventory: the model's ``{path: (out, in)}``; checks every shape before writing, and is
            required when a layer's adapters all cover only some output rows (FLUX ``linear1``).
    Returns:
        the written path.
    """
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {SAVE_DTYPES}, got {dtype}")
    path = Path(path)
    header = _file_header(weights)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, list[dict]] = {}
    for module in sorted(weights.adapters):
        group = weights.adapters[module]
        if not group:
            continue
        down, up = _stored_pair(module, group, _out_features(module, group, inventory),
                                None if inventory is None else inventory[module][1])
        check_finite({f"{module} down": down, f"{module} up": up}, "the adapters to save")
        blocks = [Block.of(a) for a in group]
        if blocks != canonical_blocks(header, down.shape[0], up.shape[0]):
            layout[module] = encode_blocks(blocks, header)
        key = module_key(module)
        if f"{key}.alpha" in tensors:
            raise ValueError(f"two module paths map to the same file key '{key}'")
        tensors[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
        # float32 even in a bf16 file: bf16 cannot hold every column count exactly (e.g. 390).
        tensors[f"{key}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
    metadata = encode_header(header)
    if layout:
        metadata["tlora.layout"] = json.dumps(layout, separators=(",", ":"))
    if weights.source_format != "tlora":
        metadata["tlora.source_format"] = weights.source_format
    metadata.update(_standard_metadata(path, header, tensors))
    merged = _merge_extra(metadata, extra_metadata)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=merged))
    log.info("saved T-LoRA %s: %d layers, %d with an explicit layout", path.name,
             len(tensors) // 3, len(layout))
    return path
