"""Reading our own T-LoRA format (see :mod:`tlora_core.files.layout`).

Each ``lora_unet_<path>`` pair is split back into the adapters it was written from; the stored
product is kept exactly (alpha / k is folded into ``up``, so this reader and a stock LoRA loader
agree at full rank). The pack writes alpha = k (scale 1): another alpha means the file was edited,
and is applied as a stock loader would, with a warning naming the file and the keys. Tensors come
in float32 whatever their stored float type (the Ortho difference is then formed in float32, and
the adapters' two factors always share one dtype).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..adapter import LowRankAdapter
from ..inventory import Inventory
from ..weights import TLoRAWeights
from .check import TLoRAFileError, alpha_value
from .layout import (
    KEY_PREFIX,
    Block,
    Header,
    canonical_blocks,
    decode_layout,
    module_key,
    parse_header,
)

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
        raise TLoRAFileError(bad + "lora_up has non-zero weights outside its adapters' blocks (as "
                             "'tlora.rank', 'tlora.parts' and 'tlora.layout' describe them; the "
                             "file was modified by another tool). Re-save it with this pack.")


def _scaled_up(stem: str, entry: dict[str, torch.Tensor], up: torch.Tensor, source: str,
               edited: list[str]) -> torch.Tensor:
    """``up`` times alpha / k; an alpha other than k (this pack's) is noted in ``edited``."""
    if ".alpha" not in entry:
        return up                                   # a stock loader's default too: alpha = k
    k = up.shape[1]
    alpha = alpha_value(entry[".alpha"], f"{stem}.alpha", source)
    if alpha == k:
        return up
    edited.append(f"'{stem}.alpha' = {alpha:g} for {k} columns")
    return up * (alpha / k)


def _adapters_for(module: str, stem: str, entry: dict[str, torch.Tensor], header: Header,
                  explicit: list[Block] | None, source: str, cache: dict,
                  edited: list[str]) -> list[LowRankAdapter]:
    down, up = entry[".lora_down.weight"].float(), entry[".lora_up.weight"].float()
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise TLoRAFileError(f"{source}: layer '{module}' has '{stem}.lora_down.weight' "
                             f"{tuple(down.shape)} and '{stem}.lora_up.weight' {tuple(up.shape)}, "
                             "which do not form a pair (need down (k, in), up (out, k)). The file "
                             "is damaged; save or download it again.")
    k = down.shape[0]
    up = _scaled_up(stem, entry, up, source, edited)
    blocks = explicit or canonical_blocks(header, k, up.shape[0])
    if blocks is None:
        raise TLoRAFileError(
            f"{source}: inconsistent T-LoRA metadata on layer '{module}': {k} columns do not match "
            f"rank {header.rank} x {header.parts} part(s) ('tlora.rank', 'tlora.parts') and no layout "
            "of it is stored under 'tlora.layout'. Re-save the file with this pack.")
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
    edited: list[str] = []
    for stem, entry in stems.items():
        module = lookup.get(stem)
        if module is None:
            unmatched.append(f"{stem}.lora_down.weight")
            continue
        adapters[module] = _adapters_for(module, stem, entry, header, layout.get(module), source,
                                         cache, edited)
    warnings = list(header.warnings)
    if edited:
        warnings.append(
            f"{source}: {len(edited)} layer(s) have an alpha other than their column count, which "
            f"this pack always writes (e.g. {', '.join(edited[:3])}): the file was edited. Each is "
            "applied with scale alpha / columns, as a stock LoRA loader does; if that is not "
            "intended, re-save the file with this pack.")
    weights = TLoRAWeights(adapters=adapters, architecture=header.architecture,
                           variant=header.variant, schedule=header.schedule, source_format="tlora",
                           metadata=dict(metadata), warnings=warnings)
    return weights, unmatched
