"""Reading our own T-LoRA format (see :mod:`tlora_core.files.layout`).

Each ``lora_unet_<path>`` pair is split back into the adapters it was written from; the stored
product is kept exactly (alpha / k is folded into ``up``, so this reader and a stock LoRA loader
agree at full rank).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from ..adapter import LowRankAdapter
from ..inventory import Inventory
from ..weights import TLoRAWeights
from .check import TLoRAFileError
from .layout import (
    KEY_PREFIX,
    Block,
    Header,
    canonical_blocks,
    decode_layout,
    module_key,
    parse_header,
)

log = logging.getLogger(__name__)

PAIR_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


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


def read_own_format(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], inventory: Inventory, *,
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
