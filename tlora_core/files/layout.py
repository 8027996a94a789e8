"""The metadata half of the T-LoRA file: schedule header and per-layer column grouping.

A T-LoRA file stores, per module, ONE kohya pair ``lora_down (k, in)``, ``lora_up (out, k)`` whose
product is the adapter's delta at full rank (t = 0). The k columns are a sequence of *blocks*, one
per adapter of the module; block j has ``columns`` columns split into ``parts`` equal parts (Ortho:
parts 2, ``[A; A_init]`` / ``[B S | -B_init S_init]``), writes the output ``rows`` (``None``: all)
and has a ``rank_index`` (column -> schedule rank) and a ``schedule``.

Most of this follows from the tensor shapes and the file-wide header (``tlora.rank`` R,
``tlora.parts`` P), so only what cannot be derived is stored (in ``tlora.layout``):

- ``k == P*R``: one block on all rows, ``rank_index = [0..R-1] * P``;
- ``k == b*P*R`` (b > 1) and ``out % b == 0``: b such blocks on b equal row ranges (FLUX's fused
  qkv with one adapter per projection);
- anything else (FLUX ``linear1`` adapters on q/k/v only, per-layer ranks, unusual grouping):
  an explicit list of blocks ``{"rows", "columns", "parts"[, "rank_index"][, "schedule"]}``.

A block's schedule defaults to the header's with its own rank: ``(q, min(min_rank, q), power, T)``
with ``q = columns / parts``, or ``None`` in an unmasked file.

A header that is only partly there is never read as something else: a missing key without which
the file cannot be read is refused by name; ``tlora.format_version`` (beside the other header
keys), ``tlora.power`` and ``tlora.T`` (beside ``tlora.min_rank``) take the values this pack
writes (1, 1.0, 1000) with a warning naming the key (:attr:`Header.warnings`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from .. import families
from ..adapter import VARIANTS, LowRankAdapter, RankSchedule
from .check import TLoRAFileError

FORMAT_VERSION = 1
KEY_PREFIX = "lora_unet_"
# Keys this pack owns; extra metadata may not overwrite them.
HEADER_KEYS = ("tlora.format_version", "tlora.variant", "tlora.architecture", "tlora.rank",
               "tlora.parts", "tlora.min_rank", "tlora.power", "tlora.T", "tlora.layout",
               "tlora.source_format")
MASKED_VARIANTS = ("tlora", "vanilla")      # always scheduled
UNMASKED_VARIANTS = ("ortho",)              # never scheduled; "lora" may be either


@dataclass(frozen=True)
class Header:
    variant: str
    architecture: str
    rank: int
    parts: int
    schedule: RankSchedule | None
    warnings: tuple[str, ...] = ()      # keys that were missing and took the pack's value

    def block_schedule(self, rank: int) -> RankSchedule | None:
        s = self.schedule
        return None if s is None else RankSchedule(rank, min(s.min_rank, rank), s.power, s.T)


@dataclass(frozen=True)
class Block:
    rows: tuple[int, int] | None
    columns: int
    parts: int
    rank_index: tuple[int, ...]
    schedule: RankSchedule | None

    @classmethod
    def of(cls, adapter: LowRankAdapter) -> Block:
        rows = None if adapter.out_rows is None else tuple(int(r) for r in adapter.out_rows)
        return cls(rows, adapter.columns, adapter.parts, tuple(adapter.rank_index.tolist()),
                   adapter.schedule)


def default_rank_index(columns: int, parts: int) -> tuple[int, ...]:
    return tuple(range(columns // parts)) * parts


def module_key(module: str) -> str:
    """``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` -> ``lora_unet_input_blocks_4_1_...``"""
    return KEY_PREFIX + module.replace(".", "_")


def canonical_blocks(header: Header, k: int, out_features: int) -> list[Block] | None:
    """The blocks implied by the shapes alone, or None when they imply nothing."""
    width = header.parts * header.rank
    if k % width:
        return None
    count = k // width
    if count == 1:
        rows: list[tuple[int, int] | None] = [None]
    elif out_features % count == 0:
        step = out_features // count
        rows = [(i * step, (i + 1) * step) for i in range(count)]
    else:
        return None
    return [Block(r, width, header.parts, default_rank_index(width, header.parts),
                  header.block_schedule(header.rank)) for r in rows]


def encode_blocks(blocks: list[Block], header: Header) -> list[dict]:
    out = []
    for b in blocks:
        entry: dict = {"rows": None if b.rows is None else list(b.rows), "columns": b.columns,
                       "parts": b.parts}
        if b.rank_index != default_rank_index(b.columns, b.parts):
            entry["rank_index"] = list(b.rank_index)
        if b.schedule != header.block_schedule(b.columns // b.parts):
            s = b.schedule
            entry["schedule"] = None if s is None else [s.rank, s.min_rank, s.power, s.T]
        out.append(entry)
    return out


def _bad(source: str, what: str) -> TLoRAFileError:
    return TLoRAFileError(f"{source}: inconsistent T-LoRA metadata: {what}. The file was edited or "
                          "written by another tool; re-save it with this pack, or apply it at "
                          "full rank with ComfyUI's LoraLoader (a plain LoRA, without the rank "
                          "schedule).")


def _decode_block(entry: object, header: Header, source: str, module: str) -> Block:
    try:
        rows = entry["rows"]
        rows = None if rows is None else (int(rows[0]), int(rows[1]))
        columns, parts = int(entry["columns"]), int(entry["parts"])
        if parts < 1 or columns < parts or columns % parts:
            raise ValueError(f"{columns} columns cannot be split into {parts} parts")
        rank_index = tuple(int(i) for i in entry.get("rank_index", default_rank_index(columns, parts)))
        schedule = header.block_schedule(columns // parts)
        if "schedule" in entry:
            s = entry["schedule"]
            schedule = None if s is None else RankSchedule(int(s[0]), int(s[1]), float(s[2]), int(s[3]))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise _bad(source, f"layout of layer '{module}' is malformed ({err})") from err
    if len(rank_index) != columns:
        raise _bad(source, f"layer '{module}' has {len(rank_index)} rank indices for {columns} columns")
    return Block(rows, columns, parts, rank_index, schedule)


def decode_layout(text: str | None, header: Header, source: str) -> dict[str, list[Block]]:
    if not text:
        return {}
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
    except (ValueError, TypeError) as err:
        raise _bad(source, f"tlora.layout is not valid JSON ({err})") from err
    layout = {}
    for module, entries in raw.items():
        if not isinstance(entries, list) or not entries:
            raise _bad(source, f"layout of layer '{module}' is not a non-empty list of blocks")
        layout[module] = [_decode_block(e, header, source, module) for e in entries]
    return layout


_KINDS = {int: "a whole number", float: "a number"}


def _number(metadata: Mapping[str, str], key: str, kind: type, source: str):
    if key not in metadata:
        raise _bad(source, f"'{key}' is missing")
    try:
        return kind(metadata[key])
    except ValueError as err:
        raise _bad(source, f"'{key}' = {metadata[key]!r} is not {_KINDS[kind]}") from err


def _missing(source: str, key: str, assumed: str) -> str:
    return (f"{source}: the T-LoRA metadata key '{key}' is missing (the file was edited); "
            f"{assumed} is assumed. Re-save the file with this pack to restore it.")


def _named(metadata: Mapping[str, str], key: str, known: tuple[str, ...], what: str, source: str) -> str:
    if key not in metadata:
        raise _bad(source, f"'{key}' is missing")
    if metadata[key] not in known:
        raise _bad(source, f"unknown {what} {metadata[key]!r} (known: {', '.join(known)})")
    return metadata[key]


def _schedule(metadata: Mapping[str, str], rank: int, source: str, warnings: list[str]) -> RankSchedule:
    """The header's rank schedule; every value is checked by its own key's name."""
    min_rank = _number(metadata, "tlora.min_rank", int, source)
    if not 1 <= min_rank <= rank:
        raise _bad(source, f"'tlora.min_rank' = {min_rank} must be between 1 and 'tlora.rank' = {rank}")
    values = {}
    for key, kind, default, assumed in (
            ("tlora.power", float, 1.0, "power 1 (the paper's linear schedule; if the file was "
             "trained with another power, set schedule_power)"),
            ("tlora.T", int, 1000, "T = 1000 (the diffusion models' training timesteps)")):
        if key in metadata:
            values[key] = _number(metadata, key, kind, source)
        else:
            values[key] = default
            warnings.append(_missing(source, key, assumed))
        if not (math.isfinite(values[key]) and values[key] > 0):
            raise _bad(source, f"'{key}' = {metadata.get(key)!r} must be a finite number > 0")
    return RankSchedule(rank, min_rank, values["tlora.power"], values["tlora.T"])


def parse_header(metadata: Mapping[str, str], source: str) -> Header:
    """Read and check the file-wide T-LoRA metadata; raise TLoRAFileError on any inconsistency
    (naming the key), record a warning for each key that took the pack's default value."""
    warnings: list[str] = []
    if "tlora.format_version" in metadata:
        version = _number(metadata, "tlora.format_version", int, source)
    else:
        version = FORMAT_VERSION
        warnings.append(_missing(source, "tlora.format_version", f"version {FORMAT_VERSION} (its other "
                                 "tlora.* keys are those of this version)"))
    if version != FORMAT_VERSION:
        raise TLoRAFileError(
            f"{source}: T-LoRA file format version {version} is not known to this pack "
            f"('tlora.format_version'; it reads version {FORMAT_VERSION}). Update the pack to load it.")
    variant = _named(metadata, "tlora.variant", VARIANTS, "variant", source)
    architecture = _named(metadata, "tlora.architecture", families.ids(), "architecture", source)
    rank = _number(metadata, "tlora.rank", int, source)
    parts = _number(metadata, "tlora.parts", int, source)
    for key, value in (("tlora.rank", rank), ("tlora.parts", parts)):
        if value < 1:
            raise _bad(source, f"'{key}' = {value} must be 1 or more")
    schedule = _schedule(metadata, rank, source, warnings) if "tlora.min_rank" in metadata else None
    if variant in MASKED_VARIANTS and schedule is None:
        raise _bad(source, f"variant '{variant}' needs a schedule but 'tlora.min_rank' is missing")
    if variant in UNMASKED_VARIANTS and schedule is not None:
        raise _bad(source, f"variant '{variant}' has no rank schedule but 'tlora.min_rank' is set")
    return Header(variant, architecture, rank, parts, schedule, tuple(warnings))


def encode_header(header: Header) -> dict[str, str]:
    meta = {"tlora.format_version": str(FORMAT_VERSION), "tlora.variant": header.variant,
            "tlora.architecture": header.architecture, "tlora.rank": str(header.rank),
            "tlora.parts": str(header.parts)}
    if header.schedule is not None:
        meta.update({"tlora.min_rank": str(header.schedule.min_rank),
                     "tlora.power": repr(float(header.schedule.power)),
                     "tlora.T": str(header.schedule.T)})
    return meta
