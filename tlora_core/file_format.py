"""The T-LoRA file: writing it, reading it, and the one entry point that reads any LoRA file.

Our file is an ordinary kohya-style LoRA that every stock loader reads: per adapted module
``lora_unet_<path>.lora_down.weight`` (k, in), ``.lora_up.weight`` (out, k) and ``.alpha`` = k, so
the stock scale alpha / k is 1 and the stock merge adds exactly ``up @ down``: the T-LoRA delta at
full rank (t = 0, every mask column on). Ortho-LoRA (paper Eq. 8) is stored as
``up = [B S | -B_init S_init]``, ``down = [A; A_init]``; several adapters on one fused module (FLUX
qkv / linear1) as one block-diagonal pair whose rows outside every adapter are zero. The rank
schedule (paper Eq. 6, with the reference code's exponent) and the column grouping the mask needs
live in string metadata (see :mod:`tlora_core.file_layout`).

:func:`load_tlora_file` detects the format of any supported file, dispatches to the matching
reader, applies the caller's ``min_rank`` / ``power`` and validates the result (see
:mod:`tlora_core.validate`) before returning anything.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import stat
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import readers
from .adapter import VARIANTS, LowRankAdapter, RankSchedule
from .file_layout import (
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
from .file_read import read_state_dict, read_tlora
from .peft_config import LoraConfigScale, find_lora_config
from .readers import detect_format
from .schedule import resolve_min_rank
from .validate import Inventory, TLoRAFileError, check_finite, validate_weights
from .weights import ARCHITECTURES, TLoRAWeights

log = logging.getLogger(__name__)

MODELSPEC_ARCHITECTURE = {"sdxl": "stable-diffusion-xl-v1-base/lora", "flux": "flux-1-dev/lora"}
SS_BASE_MODEL_VERSION = {"sdxl": "sdxl_base_v1-0", "flux": "flux1"}
SAVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["save_tlora", "load_tlora_file", "detect_format", "read_state_dict", "read_tlora",
           "TLoRAFileError"]


def _file_header(weights: TLoRAWeights) -> Header:
    if weights.variant not in VARIANTS:
        raise ValueError(f"unknown variant {weights.variant!r} (known: {', '.join(VARIANTS)})")
    if weights.architecture not in ARCHITECTURES:
        raise ValueError(f"cannot save for architecture {weights.architecture!r} "
                         f"(known: {', '.join(ARCHITECTURES)})")
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
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[header.architecture],
        "modelspec.title": path.stem,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": dim,
        "ss_base_model_version": SS_BASE_MODEL_VERSION[header.architecture],
        "ss_training_comment": (
            f"T-LoRA ({header.variant}, {schedule}). Stock LoRA loaders apply it as a plain LoRA at "
            "full rank (t = 0); a T-LoRA loader applies the timestep-dependent rank mask."),
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


def _fsync_directory(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened this way on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write to a hidden temp file in the same folder, fsync, then rename over ``path``.

    On any error (or interrupt) the temp file is removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        # safetensors writes its files with mode 0600; a LoRA should get the usual umask mode.
        with open(tmp, "xb"):
            pass
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
        with open(tmp, "r+b") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


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
    _atomic_save(tensors, _merge_extra(metadata, extra_metadata), path)
    log.info("saved T-LoRA %s: %d layers, %d with an explicit layout", path.name,
             len(tensors) // 3, len(layout))
    return path


def _check_overrides(min_rank: float | None, power: float | None) -> None:
    if min_rank is not None and (isinstance(min_rank, bool) or not math.isfinite(min_rank)
                                 or min_rank <= 0 or (min_rank >= 1 and int(min_rank) != min_rank)):
        raise ValueError(f"min_rank must be a whole rank >= 1 or a fraction in (0, 1), got {min_rank}")
    if power is not None and not (math.isfinite(power) and power > 0):
        raise ValueError(f"power must be a finite number > 0, got {power}")


def _override_schedule(weights: TLoRAWeights, min_rank: float | None,
                       power: float | None) -> TLoRAWeights:
    """Our file with the caller's min_rank (a rank, capped at each layer's rank, or a fraction of
    it) and power; unmasked adapters stay unmasked. Equal schedules stay one object (one mask)."""
    if min_rank is None and power is None:
        return weights
    memo: dict[RankSchedule, RankSchedule] = {}

    def override(s: RankSchedule | None) -> RankSchedule | None:
        if s is None:
            return None
        if s not in memo:
            m = s.min_rank if min_rank is None else resolve_min_rank(s.rank, min(min_rank, s.rank))
            memo[s] = RankSchedule(s.rank, m, s.power if power is None else power, s.T)
        return memo[s]

    adapters = {name: [replace(a, schedule=override(a.schedule), _device_copies={}) for a in group]
                for name, group in weights.adapters.items()}
    return replace(weights, adapters=adapters, schedule=override(weights.schedule))


def _read_foreign(fmt: str, sd: dict[str, torch.Tensor], inventory: Inventory, *,
                  min_rank: float | None, power: float | None, rank_refactor: bool,
                  base_weights: Mapping[str, torch.Tensor] | None, source: str,
                  lora_config: LoraConfigScale | None = None) -> TLoRAWeights:
    if fmt == "unknown":
        sample = ", ".join(f"'{k}'" for k in list(sd)[:4]) or "(no tensors)"
        raise TLoRAFileError(
            f"{source}: not a LoRA or T-LoRA file this loader knows (first keys: {sample}). It reads "
            "T-LoRA files written by this pack, the T-LoRA reference code's SDXL/FLUX files, LyCORIS "
            "'tlora' files and kohya/diffusers LoRA files.")
    common = {"min_rank": min_rank, "power": power, "source": source}
    try:
        if fmt == "lora":
            return readers.read_plain_lora(sd, inventory, refactor=rank_refactor,
                                           lora_config=lora_config, **common)
        if fmt == "lycoris":
            return readers.read_lycoris(sd, inventory, base_weights=base_weights, **common)
        reader = {"reference-sdxl": readers.read_reference_sdxl,
                  "reference-flux": readers.read_reference_flux}[fmt]
        return reader(sd, inventory, **common)
    except TLoRAFileError:
        raise
    except ValueError as err:
        raise TLoRAFileError(f"{source}: {err}") from err


def load_tlora_file(path: str | os.PathLike, inventory: Inventory, *, min_rank: float | None = None,
                    power: float | None = None, rank_refactor: bool = False,
                    base_weights: Mapping[str, torch.Tensor] | None = None) -> TLoRAWeights:
    """Read any supported LoRA / T-LoRA file for the model described by ``inventory``.

    Detects the format (our T-LoRA file, the reference code's SDXL / FLUX files, LyCORIS ``tlora``,
    plain kohya / diffusers LoRA), reads it onto the model's module paths, and validates the result.
    A diffusers / PEFT LoRA is scaled by the ``lora_alpha / r`` of its PEFT config (its
    ``lora_adapter_metadata`` metadata, else an ``adapter_config.json`` in its folder).

    Args:
        path: ``.safetensors`` (any format) or ``.pt`` / ``.pth`` / ``.bin`` (tensors-only pickle,
            read with ``weights_only=True``).
        inventory: the target model's ``{path: (out_features, in_features)}``
            (:func:`tlora_core.validate.inventory_from_module`).
        min_rank: overrides the file's: a rank (capped at each layer's rank) or a fraction in
            (0, 1) of each layer's rank. Files without a schedule (the reference code's) default
            to rank / 2, with a warning.
        power: overrides the file's schedule exponent (default 1, the paper's linear schedule).
        rank_refactor: re-factor a plain LoRA into orthogonal components sorted by singular value
            so the rank schedule can be applied to it.
        base_weights: ``{module path: weight}`` of the model; only LyCORIS ``tlora`` files need it
            (they do not store their frozen factors, which are rebuilt from the base weights).
    Raises:
        TLoRAFileError: the file cannot be used; nothing is returned half-read.
        ValueError: ``min_rank`` / ``power`` are out of range.
    """
    _check_overrides(min_rank, power)
    path = Path(path)
    source = path.name
    sd, metadata = read_state_dict(path)
    check_finite(sd, source)
    fmt = detect_format(sd.keys(), metadata)
    unmatched: list[str] = []
    # An unscheduled LoRA of ours is a plain kohya LoRA: re-factoring it is the plain reader's job.
    refactor_ours = rank_refactor and fmt == "tlora" and metadata.get("tlora.variant") == "lora" \
        and "tlora.min_rank" not in metadata
    if fmt == "tlora" and not refactor_ours:
        weights, unmatched = read_tlora(sd, metadata, inventory, source=source)
        weights = _override_schedule(weights, min_rank, power)
    else:
        fmt = "lora" if fmt == "tlora" else fmt
        lora_config = find_lora_config(path, metadata, sd) if fmt == "lora" else None
        weights = _read_foreign(fmt, sd, inventory, min_rank=min_rank, power=power,
                                rank_refactor=rank_refactor, base_weights=base_weights,
                                source=source, lora_config=lora_config)
        weights = replace(weights, metadata=weights.metadata or dict(metadata))
    return validate_weights(weights, inventory, source, file_keys=list(sd), unmatched_keys=unmatched)
