"""The one entry point that reads any supported LoRA / T-LoRA file for a model.

:func:`load_tlora_file` reads the file safely (:mod:`.raw`), checks its tensors (:mod:`.check`:
float types only, float8 up-cast, no empty or non-finite tensor, sane alphas), detects its format,
dispatches to our own format's reader (:mod:`.own`) or a foreign one (:mod:`.foreign`), applies the
caller's ``min_rank`` / ``power`` and validates the result (:mod:`.check`) before returning anything.

Whatever goes wrong while reading reaches the caller as a :class:`~.check.TLoRAFileError` naming
the file: the checks' own messages name the key too; any other exception (a case no check
foresaw) is wrapped, and its traceback logged, so that a damaged file never surfaces as a bare
``ZeroDivisionError`` here or fails later inside the sampler.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from ..adapter import RankSchedule
from ..families import Family
from ..inventory import Inventory
from ..schedule import resolve_min_rank
from ..weights import TLoRAWeights
from .check import TLoRAFileError, check_file_tensors, validate_weights
from .foreign import detect_format, read_foreign
from .layout import HEADER_KEYS
from .own import read_own_format
from .peft import find_lora_config
from .raw import read_state_dict

log = logging.getLogger(__name__)


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


def load_tlora_file(path: str | os.PathLike, inventory: Inventory, *, min_rank: float | None = None,
                    power: float | None = None, rank_refactor: bool = False,
                    base_weights: Mapping[str, torch.Tensor] | None = None,
                    family: Family | None = None) -> TLoRAWeights:
    """Read any supported LoRA / T-LoRA file for the model described by ``inventory``.

    Detects the format (our T-LoRA file, the reference code's SDXL / FLUX files, LyCORIS ``tlora``,
    plain kohya / diffusers LoRA), reads it onto the model's module paths, and validates the result.
    A diffusers / PEFT LoRA is scaled by the ``lora_alpha / r`` of its PEFT config (its
    ``lora_adapter_metadata`` metadata, else an ``adapter_config.json`` in its folder).

    Args:
        path: ``.safetensors`` (any format) or ``.pt`` / ``.pth`` / ``.bin`` (tensors-only pickle,
            read with ``weights_only=True``).
        inventory: the target model's ``{path: (out_features, in_features)}``
            (:func:`tlora_core.inventory.inventory_from_module`).
        min_rank: overrides the file's: a rank (capped at each layer's rank) or a fraction in
            (0, 1) of each layer's rank. Files without a schedule (the reference code's) default
            to rank / 2, with a warning.
        power: overrides the file's schedule exponent (default 1, the paper's linear schedule).
        rank_refactor: re-factor a plain LoRA into orthogonal components sorted by singular value
            so the rank schedule can be applied to it.
        base_weights: ``{module path: weight}`` of the model; only LyCORIS ``tlora`` files need it
            (they do not store their frozen factors, which are rebuilt from the base weights).
        family: the model's family (:func:`tlora_core.families.recognise`); default: the one the
            inventory's module names show.
    Raises:
        TLoRAFileError: the file cannot be used; nothing is returned half-read.
        ValueError: ``min_rank`` / ``power`` are out of range.
    """
    _check_overrides(min_rank, power)
    path = Path(path)
    try:
        return _read(path, inventory, min_rank=min_rank, power=power, rank_refactor=rank_refactor,
                     base_weights=base_weights, family=family)
    except TLoRAFileError:
        raise
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise                                   # the machine's limit, not the file's fault
    except ValueError as err:                   # the core's readable messages, without the file
        raise TLoRAFileError(f"{path.name}: {err}") from err
    except Exception as err:
        log.error("%s: unexpected error while reading the file", path.name, exc_info=err)
        raise TLoRAFileError(
            f"{path.name}: cannot be read ({type(err).__name__}: {err}). The file is damaged or "
            "of a kind this loader does not know; save or download it again (the log has the "
            "details for a bug report).") from err


def _read(path: Path, inventory: Inventory, *, min_rank: float | None, power: float | None,
          rank_refactor: bool, base_weights: Mapping[str, torch.Tensor] | None,
          family: Family | None) -> TLoRAWeights:
    source = path.name
    sd, metadata = read_state_dict(path)
    sd = check_file_tensors(sd, source)
    fmt = detect_format(sd.keys(), metadata)
    unmatched: list[str] = []
    # An unscheduled LoRA of ours is a plain kohya LoRA: re-factoring it is the plain reader's job.
    refactor_ours = rank_refactor and fmt == "tlora" and metadata.get("tlora.variant") == "lora" \
        and "tlora.min_rank" not in metadata
    if fmt == "tlora" and not refactor_ours:
        weights, unmatched = read_own_format(sd, metadata, inventory, source=source)
        weights = _override_schedule(weights, min_rank, power)
    else:
        fmt = "lora" if fmt == "tlora" else fmt
        lora_config = find_lora_config(path, metadata, sd) if fmt == "lora" else None
        weights = read_foreign(fmt, sd, inventory, min_rank=min_rank, power=power,
                               rank_refactor=rank_refactor, base_weights=base_weights,
                               source=source, lora_config=lora_config, family=family)
        weights = replace(weights, metadata=weights.metadata or dict(metadata),
                          warnings=[*weights.warnings, *_schedule_lost(metadata, source)])
    weights = validate_weights(weights, inventory, source, file_keys=list(sd), unmatched_keys=unmatched)
    return _warn_on_family_label(weights, family, source)


def _schedule_lost(metadata: Mapping[str, str], source: str) -> list[str]:
    """A warning for a file read as a plain LoRA although its metadata has tlora.* entries (a
    file of ours whose header was stripped, e.g. by a tool that rewrote the metadata)."""
    ours = sorted(k for k in metadata if k.startswith("tlora."))
    if not ours or any(k in metadata for k in HEADER_KEYS):   # a header: read as ours (or refactored)
        return []
    return [f"{source}: has T-LoRA metadata ({', '.join(repr(k) for k in ours[:3])}) but no "
            "'tlora.format_version' nor any other key of the T-LoRA header: it is read as a plain "
            "LoRA at full rank, without a rank schedule. If it is a T-LoRA file of this pack, its "
            "header was removed; use the file as T-LoRA Train saved it."]


def _warn_on_family_label(weights: TLoRAWeights, family: Family | None, source: str) -> TLoRAWeights:
    """A file of ours labelled for another family than the model its layers fit: said, not hidden
    (the layers are applied, since they fit; the label is what is wrong, e.g. an edited file)."""
    label = weights.architecture if weights.source_format == "tlora" else None
    if family is None or not label or label == family.id:
        return weights
    message = (f"{source}: the metadata key 'tlora.architecture' says '{label}', but the file's layers "
               f"fit this {family.label} model and are applied to it. If the file was made for "
               f"another model, use that model; otherwise re-save it with this pack.")
    log.warning(message)
    return replace(weights, warnings=[*weights.warnings, message])
