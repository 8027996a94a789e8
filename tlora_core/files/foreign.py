"""Reading the LoRA / T-LoRA files other tools write: format detection, and plain LoRAs.

Every reader returns a :class:`~tlora_core.weights.TLoRAWeights` of
:class:`~tlora_core.adapter.LowRankAdapter` s, whose forward reproduces the source tool's.
:func:`detect_format` tells the formats apart and :func:`read_foreign` dispatches; the T-LoRA
files of the reference code and LyCORIS are read in :mod:`.foreign_tlora`; this module reads

- plain LoRA (kohya ``lora_unet_*``, ComfyUI ``diffusion_model.*``, diffusers / peft ``unet.*`` /
  ``transformer.*``, LyCORIS LoCon): ``y = W x + alpha/r * up(down(x))`` (scale folded into up).
  alpha is the layer's ``.alpha`` tensor; diffusers / PEFT files store none and take it from their
  PEFT LoraConfig (:mod:`.peft`, passed in as ``lora_config``); without either
  the scale is 1 (for PEFT-style files, with a warning that it is assumed).
  With ``refactor=True`` each layer is re-factored (:mod:`tlora_core.refactor`) into components
  sorted by singular value and given the rank schedule, so any LoRA gets a timestep schedule.

These files carry no schedule: ``min_rank`` / ``power`` come from the caller (default
:func:`tlora_core.schedule.default_min_rank`, recorded as a warning, and power 1). Keys a reader cannot use (text encoders,
convolutions, other algorithms) are counted and reported in ``weights.warnings``; layers that match
no module of the model are reported too, and a file of which nothing matches raises.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch

from ..families import Family
from ..inventory import Inventory
from ..refactor import refactor_lowrank
from ..weights import TLoRAWeights
from . import foreign_tlora
from .check import TLoRAFileError, alpha_value
from .collect import AdapterCollector, pair_factors
from .layout import HEADER_KEYS
from .names import split_lora_key, strip_prefix
from .peft import LoraConfigScale, is_peft_style


def _plain_groups(b: AdapterCollector, sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in sd.items():
        split = split_lora_key(key)
        if split is None:
            b.skip("not LoRA up/down/alpha tensors (e.g. LoHa, LoKr, T-LoRA parameters)", key)
            continue
        name, part = split
        if strip_prefix(name)[1]:
            b.skip("text-encoder layers (only the diffusion model is adapted)", key)
        elif part == "dora":
            raise TLoRAFileError(f"{b.source}: '{key}' is a DoRA magnitude; DoRA files cannot be "
                                 "applied as an additive low-rank term. Use a plain LoRA.")
        else:
            groups[name][part] = tensor
    return groups


def _plain_scale(parts: Mapping[str, torch.Tensor], name: str, layer: str, rank: int,
                 lora_config: LoraConfigScale | None, source: str) -> float | None:
    """alpha / r of one layer (``name`` as in the file, ``layer`` without its prefix): its
    ``.alpha`` tensor (kohya, ComfyUI, LyCORIS), else the PEFT config's; None when neither states
    it (the caller applies scale 1)."""
    if "alpha" in parts:
        return alpha_value(parts["alpha"], f"{name}.alpha", source) / rank
    return None if lora_config is None else lora_config.scale(layer, rank, source)


def read_plain_lora(sd: Mapping[str, torch.Tensor], inventory: Inventory, *,
                    min_rank: float | None = None, power: float | None = None,
                    refactor: bool = False, source: str = "file",
                    lora_config: LoraConfigScale | None = None,
                    family: Family | None = None) -> TLoRAWeights:
    """Read a plain LoRA (kohya / ComfyUI / diffusers / LyCORIS LoCon keys).

    ``refactor=False``: unmasked adapters ``alpha/r * up @ down``. ``refactor=True``: each layer's
    delta re-factored into components sorted by singular value, masked with a schedule of that
    layer's rank (``min_rank`` capped at it). ``lora_config``: the PEFT LoraConfig a diffusers /
    PEFT file was saved with, for layers without an ``.alpha`` tensor.
    """
    b = AdapterCollector(inventory, source, family=family)
    if lora_config is not None and lora_config.use_dora:
        raise TLoRAFileError(f"{source}: {lora_config.where} says use_dora: DoRA files cannot be "
                             "applied as an additive low-rank term. Use a plain LoRA.")
    unscaled = 0
    for name, parts in _plain_groups(b, sd).items():
        if "mid" in parts or parts.get("down", torch.empty(0, 0)).ndim != 2:
            b.skip("convolution layers (only Linear layers are adapted)", name)
            continue
        if not {"down", "up"} <= set(parts):
            raise TLoRAFileError(f"{source}: layer '{name}' has {sorted(parts)} but needs both "
                                 "up and down weights.")
        layer = strip_prefix(name)[0]
        target = b.resolve(layer, name)
        if target is None:
            continue
        down, up = pair_factors(parts["down"], parts["up"], name, source)
        scale = _plain_scale(parts, name, layer, down.shape[0], lora_config, source)
        unscaled += scale is None
        up = up * (1.0 if scale is None else scale)
        if not refactor:
            b.add(target, name, down, up)
            continue
        b.check(target, name, down, up)
        down, up, _ = refactor_lowrank(down, up)
        b.add(target, name, down, up, schedule=b.schedule(down.shape[0], min_rank, power))
    if unscaled and is_peft_style(sd):
        b.warnings.append(
            f"{source}: a diffusers / PEFT LoRA that does not state its lora_alpha (no "
            "'lora_adapter_metadata' with one, no adapter_config.json beside it, no .alpha "
            f"tensors): scale 1 (lora_alpha = r) is assumed for {unscaled} layer(s), as diffusers "
            "does. If it was trained with another lora_alpha, its effect is off by lora_alpha / r; "
            "adjust strength_model.")
    if refactor:
        b.warnings.append(f"{source}: plain LoRA re-factored into orthogonal components sorted by "
                          "singular value; the rank schedule masks the weakest first.")
    return b.finish(sd, "vanilla" if refactor else "lora", "lora", masked=refactor)


def detect_format(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
    """"tlora" | a reference-code format (``"reference-sdxl"``, ``"reference-flux"``: the formats
    the families' ``reference_files`` declare) | "lycoris" | "lora" | "unknown".

    Any of our header keys (``tlora.format_version``, ``tlora.rank``, ...) makes it ours: a header
    that is partly there is read (or refused) as ours, naming what is missing, never read as a
    plain LoRA that silently loses its rank schedule."""
    if metadata and any(key in metadata for key in HEADER_KEYS):
        return "tlora"
    keys = list(keys)
    reference = foreign_tlora.detect_reference(keys)
    if reference is not None:
        return reference
    if any(k.startswith("lycoris_") and k.endswith(".lambda_layer") for k in keys):
        return "lycoris"
    if any((s := split_lora_key(k)) is not None and s[1] in ("down", "up") for k in keys):
        return "lora"
    return "unknown"


def read_foreign(fmt: str, sd: dict[str, torch.Tensor], inventory: Inventory, *,
                 min_rank: float | None, power: float | None, rank_refactor: bool,
                 base_weights: Mapping[str, torch.Tensor] | None, source: str,
                 lora_config: LoraConfigScale | None = None,
                 family: Family | None = None) -> TLoRAWeights:
    """Read a file of format ``fmt`` (from :func:`detect_format`, not ``"tlora"``); every
    ValueError becomes a TLoRAFileError naming the file."""
    if fmt == "unknown":
        sample = ", ".join(f"'{k}'" for k in list(sd)[:4]) or "(no tensors)"
        raise TLoRAFileError(
            f"{source}: not a LoRA or T-LoRA file this loader knows (first keys: {sample}). It reads "
            "T-LoRA files written by this pack, the T-LoRA reference code's SDXL/FLUX files, LyCORIS "
            "'tlora' files and kohya/diffusers LoRA files.")
    common = {"min_rank": min_rank, "power": power, "source": source, "family": family}
    try:
        if fmt == "lora":
            return read_plain_lora(sd, inventory, refactor=rank_refactor, lora_config=lora_config,
                                   **common)
        if fmt == "lycoris":
            return foreign_tlora.read_lycoris(sd, inventory, base_weights=base_weights, **common)
        return foreign_tlora.read_reference(sd, inventory, fmt, **common)
    except TLoRAFileError:
        raise
    except ValueError as err:
        raise TLoRAFileError(f"{source}: {err}") from err

