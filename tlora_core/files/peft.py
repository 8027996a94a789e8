"""The scale of diffusers / PEFT LoRA files: ``lora_alpha / r`` from the PEFT LoraConfig they were saved with.

PEFT, and diffusers which loads LoRAs through it, adds ``scale * B (A x)`` per module with
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). ``r`` and ``lora_alpha``
come from ``rank_pattern`` / ``alpha_pattern`` when one of their keys matches the module's name,
else from the config's ``r`` / ``lora_alpha``. PEFT's matching rule: a key is a regular expression
that must match the whole name or a dot-separated tail of it (``to_q`` matches
``transformer_blocks.0.attn.to_q``); the first key that matches wins.

Such files hold ``lora_A`` / ``lora_B`` tensors and no alpha. The config lives

- in the safetensors metadata entry ``lora_adapter_metadata``, a JSON object: diffusers'
  ``save_lora_adapter`` stores the LoraConfig's fields as they are (``lora_alpha``, ``r``, ...),
  a pipeline's ``save_lora_weights`` prefixes them with the component (``transformer.lora_alpha``,
  ``unet.r``; the diffusion model's component is the one read here);
- or, for ``PeftModel.save_pretrained``, in ``adapter_config.json`` in the weights' folder.

A file with neither is read with scale 1 (what diffusers does when it finds no alpha: alpha = r),
and the reader says so, since the file may have been trained with another ``lora_alpha``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .check import TLoRAFileError

log = logging.getLogger(__name__)

METADATA_KEY = "lora_adapter_metadata"
CONFIG_FILE = "adapter_config.json"
# The diffusion model's component in diffusers pipeline files (text encoders are not adapted here).
COMPONENTS = ("transformer", "unet")
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class LoraConfigScale:
    """The LoraConfig fields that set each module's scale, and where they were read (for messages).

    ``r`` None: the config does not state it; each layer's own rank is used.
    """

    lora_alpha: float
    r: int | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    where: str = "its LoRA config"       # e.g. "its metadata entry 'lora_adapter_metadata'"

    def rank_and_alpha(self, name: str) -> tuple[int | None, float]:
        """``(r, lora_alpha)`` PEFT uses for the module called ``name`` (diffusers module name)."""
        r_key, alpha_key = _pattern_key(self.rank_pattern, name), _pattern_key(self.alpha_pattern, name)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[alpha_key] if alpha_key is not None else self.lora_alpha
        return r, alpha

    def scale(self, name: str, rank: int, source: str) -> float:
        """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) of layer ``name`` whose tensors have ``rank``.

        Raises TLoRAFileError when the config gives the layer another rank: then it does not
        describe this file (PEFT would refuse to load the tensors into its layers).
        """
        r, alpha = self.rank_and_alpha(name)
        if r is not None and r != rank:
            raise TLoRAFileError(
                f"{source}: layer '{name}' has rank {rank}, but {self.where} gives it r = {r}; that "
                "config does not describe this file's tensors. Use the config saved with this "
                "file (or remove the wrong one) to load it.")
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def _pattern_key(patterns: Mapping[str, Any], name: str) -> str | None:
    """The first pattern that matches ``name`` whole or a dot-separated tail of it (PEFT's rule)."""
    for key in patterns:
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return key
    return None


def _number(value: Any, what: str, origin: str, *, positive_int: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and positive_int:
        ok = value == int(value) and value >= 1
    if not ok:
        kind = "a whole number >= 1" if positive_int else "a finite number"
        raise TLoRAFileError(f"{origin}: '{what}' must be {kind}, got {value!r}. Re-save the file "
                             "with diffusers / PEFT, or fix that entry.")
    return int(value) if positive_int else float(value)


def _pattern(value: Any, what: str, origin: str, *, positive_int: bool) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TLoRAFileError(f"{origin}: '{what}' must be an object of module pattern -> value, got "
                             f"{type(value).__name__}.")
    out = {}
    for key, v in value.items():
        try:
            re.compile(key)
        except re.error as err:
            raise TLoRAFileError(f"{origin}: '{what}' key {key!r} is not a valid pattern ({err}).") from None
        out[key] = _number(v, f"{what}[{key!r}]", origin, positive_int=positive_int)
    return out


def parse_lora_config(fields: Mapping[str, Any], origin: str, where: str) -> LoraConfigScale | None:
    """The scale fields of a LoraConfig given as a dict (``r``, ``lora_alpha``, optional
    ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ``use_dora``); None if it states no
    ``lora_alpha``.

    ``origin`` names file and key in errors; ``where`` says, for the LoRA file's later messages,
    where the config was found. Raises TLoRAFileError for values of the wrong type.
    """
    if fields.get("lora_alpha") is None:
        return None
    r = fields.get("r")
    return LoraConfigScale(
        lora_alpha=_number(fields["lora_alpha"], "lora_alpha", origin),
        r=None if r is None else _number(r, "r", origin, positive_int=True),
        rank_pattern=_pattern(fields.get("rank_pattern"), "rank_pattern", origin, positive_int=True),
        alpha_pattern=_pattern(fields.get("alpha_pattern"), "alpha_pattern", origin, positive_int=False),
        use_rslora=bool(fields.get("use_rslora", False)), use_dora=bool(fields.get("use_dora", False)),
        where=where)


def _diffusion_model_fields(blob: Mapping[str, Any]) -> Mapping[str, Any]:
    """The LoraConfig fields of the diffusion model: unprefixed, or under ``transformer.`` / ``unet.``."""
    if "lora_alpha" in blob or "r" in blob:
        return blob
    for component in COMPONENTS:
        prefix = f"{component}."
        fields = {k[len(prefix):]: v for k, v in blob.items() if k.startswith(prefix)}
        if fields:
            return fields
    return {}


def from_metadata(metadata: Mapping[str, str], source: str) -> LoraConfigScale | None:
    """The config in a safetensors file's ``lora_adapter_metadata`` entry, or None if it has none.

    Raises TLoRAFileError naming the file and the entry when it is not a JSON object.
    """
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    origin = f"{source}: metadata entry '{METADATA_KEY}'"
    try:
        blob = json.loads(raw)
    except (TypeError, ValueError) as err:
        raise TLoRAFileError(
            f"{origin} is not valid JSON ({err}), so the LoRA's scale (lora_alpha / r) cannot be "
            "read. Re-save the file with diffusers / PEFT, or fix or remove that metadata entry.") from None
    if not isinstance(blob, dict):
        raise TLoRAFileError(f"{origin} holds a {type(blob).__name__}, not a JSON object of LoraConfig "
                             "fields. Re-save the file with diffusers / PEFT, or remove that entry.")
    return parse_lora_config(_diffusion_model_fields(blob), origin,
                             f"its metadata entry '{METADATA_KEY}'")


def from_adapter_config(path: Path) -> LoraConfigScale | None:
    """The config in a PEFT ``adapter_config.json``, or None if it states no ``lora_alpha``."""
    origin = f"{path.parent.name}/{path.name}"
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise TLoRAFileError(f"{origin}: cannot be read as JSON ({err}); the LoRA beside it needs its "
                             "lora_alpha. Fix or remove that file.") from None
    if not isinstance(blob, dict):
        raise TLoRAFileError(f"{origin}: holds a {type(blob).__name__}, not a PEFT LoraConfig object.")
    return parse_lora_config(blob, origin, f"the {CONFIG_FILE} beside it")


def is_peft_style(keys: Iterable[str]) -> bool:
    """Whether a file's LoRA tensors use PEFT's ``lora_A`` / ``lora_B`` names."""
    return any(k.endswith(PEFT_SUFFIXES) for k in keys)


def find_lora_config(path: Path, metadata: Mapping[str, str], keys: Iterable[str]
                     ) -> LoraConfigScale | None:
    """The LoraConfig that sets the scale of the LoRA file at ``path``, or None if none is known.

    Only PEFT-style files (``lora_A`` / ``lora_B`` keys) are looked up; kohya / ComfyUI / LyCORIS
    files keep their scale in ``.alpha`` tensors. The file's ``lora_adapter_metadata`` wins; without
    that entry, ``adapter_config.json`` from the file's folder is read when it exists.
    """
    if not is_peft_style(keys):
        return None
    config = from_metadata(metadata, path.name)
    if config is not None or METADATA_KEY in metadata:
        return config
    beside = path.parent / CONFIG_FILE
    if not beside.is_file():
        return None
    config = from_adapter_config(beside)
    if config is not None:
        log.info("%s: lora_alpha %g (r %s) read from the %s beside it", path.name, config.lora_alpha,
                 config.r, CONFIG_FILE)
    return config
