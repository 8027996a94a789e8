"""Reading files safely, and reading our own T-LoRA format.

Only two ways in: safetensors (never executes anything), and for ``.pt`` / ``.pth`` / ``.bin``
``torch.load(..., weights_only=True)`` accepting nothing but a flat dict of tensors. Every failure
becomes a :class:`~tlora_core.validate.TLoRAFileError` naming the file.

Our format (see :mod:`tlora_core.file_layout`): each ``lora_unet_<path>`` pair is split back into
the adapters it was written from; the stored product is kept exactly (alpha / k is folded into
``up``, so this loader and a stock LoRA loader agree at full rank).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from .adapter import LowRankAdapter
from .file_layout import (
    KEY_PREFIX,
    Block,
    Header,
    canonical_blocks,
    decode_layout,
    module_key,
    parse_header,
)
from .validate import Inventory, TLoRAFileError
from .weights import TLoRAWeights

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
PAIR_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")     # torch's zip container, a raw pickle stream


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise TLoRAFileError(
            f"{path.name}: refused: the pickle holds objects other than tensors, and loading it "
            "could run code. Convert it to .safetensors with a tool you trust.") from err
    except Exception as err:  # torch raises many different types for damaged archives
        raise TLoRAFileError(f"{path.name}: cannot be read as a PyTorch file, it is corrupt or "
                             f"truncated ({type(err).__name__}: {err}). Download it again.") from err
    if not isinstance(data, dict):
        raise TLoRAFileError(f"{path.name}: holds a {type(data).__name__}, not a dict of tensors.")
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TLoRAFileError(
                f"{path.name}: entry {key!r} is a {type(value).__name__}, not a tensor. Only flat "
                "dicts of tensors are read; extract the LoRA weights into a .safetensors file.")
    return data


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
    except Exception as err:  # SafetensorError, OSError, ValueError: all mean "unreadable"
        with open(path, "rb") as handle:
            head = handle.read(4)
        if head.startswith(_PICKLE_MAGIC):
            raise TLoRAFileError(
                f"{path.name}: not a safetensors file (it looks like a PyTorch pickle). Only "
                f".safetensors, or {'/'.join(PICKLE_SUFFIXES)} files holding tensors only, are "
                "read.") from err
        raise TLoRAFileError(
            f"{path.name}: not a valid safetensors file: it is corrupt, truncated or of another "
            f"kind ({err}). Download or save it again.") from err


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file, or of a tensors-only ``.pt/.pth/.bin``
    (metadata ``{}``). Raises TLoRAFileError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise TLoRAFileError(f"{path.name}: no such file ({path.parent}).")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path), {}
    return _read_safetensors(path)


def _group_pairs(sd: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, dict], list[str]]:
    stems: dict[str, dict[str, torch.Tensor]] = {}
    other: list[str] = []
    for key, tensor in sd.items():
        suffix = next((s for s in PAIR_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(KEY_PREFIX):
            other.append(key)
            continue
        stems.setdefault(key[:-len(suffix)], {})[suffix] = tensor
    for stem, entry in stems.items():
        for needed in PAIR_SUFFIXES[:2]:
            if needed not in entry:
                raise TLoRAFileError(f"{source}: layer '{stem}' has no '{needed}' tensor; the file is "
                                     "incomplete. Save or download it again.")
    return stems, other


def _as_float(t: torch.Tensor) -> torch.Tensor:
    # Half-precision files are up-cast: the Ortho difference is then formed in float32.
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_blocks(blocks: list[Block], up: torch.Tensor, source: str, module: str) -> None:
    out_features, k = up.shape
    bad = f"{source}: inconsistent T-LoRA metadata on layer '{module}': "
    if sum(b.columns for b in blocks) != k:
        raise TLoRAFileError(bad + f"the layout has {sum(b.columns for b in blocks)} columns, the "
                             f"tensors {k}. Re-save the file with this pack.")
    if len(blocks) == 1 and blocks[0].rows is None:
        return                                  # the usual case: one adapter on the whole layer
    covered = torch.zeros(up.shape, dtype=torch.bool)
    col = 0
    for b in blocks:
        if b.rows is not None and not 0 <= b.rows[0] < b.rows[1] <= out_features:
            raise TLoRAFileError(bad + f"rows {b.rows} outside the layer's {out_features} outputs.")
        covered[slice(None) if b.rows is None else slice(*b.rows), col:col + b.columns] = True
        col += b.columns
    if not bool(covered.all()) and bool(up[~covered].any()):
        raise TLoRAFileError(bad + "lora_up has non-zero weights outside its adapters' blocks (the "
                             "file was modified by another tool). Load it as a plain LoRA instead.")


def _adapters_for(module: str, entry: dict[str, torch.Tensor], header: Header,
                  explicit: list[Block] | None, source: str, cache: dict) -> list[LowRankAdapter]:
    down, up = _as_float(entry[".lora_down.weight"]), _as_float(entry[".lora_up.weight"])
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise TLoRAFileError(f"{source}: layer '{module}' has lora_down {tuple(down.shape)} and "
                             f"lora_up {tuple(up.shape)}, which do not form a pair. Re-save the file.")
    k = down.shape[0]
    if ".alpha" in entry and float(entry[".alpha"]) != k:
        # Edited by another tool: apply alpha / k as a stock loader does, so both loaders agree.
        log.info("%s: layer '%s' has alpha %g for %d columns; scaling by alpha / k", source, module,
                 float(entry[".alpha"]), k)
        up = up * (float(entry[".alpha"]) / k)
    blocks = explicit or canonical_blocks(header, k, up.shape[0])
    if blocks is None:
        raise TLoRAFileError(
            f"{source}: inconsistent T-LoRA metadata on layer '{module}': {k} columns do not match "
            f"rank {header.rank} x {header.parts} part(s) and no layout is stored. Re-save the file "
            "with this pack, or load it as a plain LoRA.")
    _check_blocks(blocks, up, source, module)
    adapters, col = [], 0
    for b in blocks:
        rank_index = cache.setdefault(b.rank_index, torch.tensor(b.rank_index, dtype=torch.int64))
        rows = slice(None) if b.rows is None else slice(*b.rows)
        adapters.append(LowRankAdapter(
            down=down[col:col + b.columns].contiguous(), up=up[rows, col:col + b.columns].contiguous(),
            rank_index=rank_index, schedule=b.schedule, parts=b.parts, out_rows=b.rows))
        col += b.columns
    return adapters


def read_tlora(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], inventory: Inventory, *,
               source: str) -> tuple[TLoRAWeights, list[str]]:
    """Our format -> ``(weights, unmatched file keys)``; shapes are checked by the validator."""
    header = parse_header(metadata, source)
    layout = decode_layout(metadata.get("tlora.layout"), header, source)
    stems, unmatched = _group_pairs(sd, source)
    lookup = {module_key(path): path for path in inventory}
    stray = [m for m in layout if module_key(m) not in stems]
    if stray:
        raise TLoRAFileError(f"{source}: inconsistent T-LoRA metadata: the layout names layers with "
                             f"no tensors ({stray[:3]}). Re-save the file with this pack.")
    adapters: dict[str, list[LowRankAdapter]] = {}
    cache: dict[tuple[int, ...], torch.Tensor] = {}   # one rank_index per layout: shared masks
    for stem, entry in stems.items():
        module = lookup.get(stem)
        if module is None:
            unmatched.append(f"{stem}.lora_down.weight")
            continue
        adapters[module] = _adapters_for(module, entry, header, layout.get(module), source, cache)
    weights = TLoRAWeights(adapters=adapters, architecture=header.architecture,
                           variant=header.variant, schedule=header.schedule, source_format="tlora",
                           metadata=dict(metadata))
    return weights, unmatched
