"""Checks applied to every T-LoRA / LoRA file before anything of it is used.

Contract: :func:`tlora_core.files.read.load_tlora_file` either returns a :class:`TLoRAWeights`
whose every adapter fits a Linear layer of the target model, or raises :class:`TLoRAFileError`
(a ``ValueError``) whose message names the file, says what is wrong and what to do. Nothing is
returned half-checked, so nothing is half-applied.

The target model is described by its inventory (:mod:`tlora_core.inventory`). Which family a
file looks made for is guessed from its metadata and key names, for the message when nothing fits.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import torch

from .. import families
from ..inventory import Inventory
from ..weights import TLoRAWeights

log = logging.getLogger(__name__)

# What a file can look made for: the known families, a few the pack does not load, and undecided.
_JOINT = [f for f in families.all_families() if f.diffusers_joint_blocks]
ARCHITECTURE_LABELS = {
    **{f.id: f.label for f in families.all_families()}, "sd1": "SD 1.x/2.x",
    "diffusers-joint": f"{', '.join(f.label for f in _JOINT[:-1])} or {_JOINT[-1].label} (diffusers names "
                       "their joint blocks alike)",
    "text-encoder": "text encoders only", "unknown": "an unrecognised model",
}
# The families' own key hints (Family.file_key_hint), asked before the generic rules below.
_HINTS = [(f.id, re.compile(f.file_key_hint)) for f in families.all_families() if f.file_key_hint]


class TLoRAFileError(ValueError):
    """A LoRA / T-LoRA file that cannot be used; the message names the file and the fix."""


def detect_architecture(inventory: Inventory) -> str:
    """The id of the family whose module names the inventory shows, or ``"unknown"``."""
    try:
        return families.from_inventory(inventory).id
    except families.UnknownFamily:
        return "unknown"


_FLUX_KEY = re.compile(r"(double|single)[._]blocks|(^|[._])(single_)?transformer[._]blocks[._]\d+[._]attn[._]")
_UNET_KEY = re.compile(r"(input|output)[._]blocks|middle[._]block|(down|up)[._]blocks|mid[._]block")
# Attention in the first UNet level exists in SD 1.x/2.x, not in SDXL.
_SD1_KEY = re.compile(r"input[._]blocks[._][12][._]1[._]|down[._]blocks[._]0[._]attentions")
_TE_KEY = re.compile(r"^(lora_te\d?_|text_encoder|te\d?[._]|clip_|t5)")
# diffusers spells FLUX's double blocks, SD3's joint blocks and Qwen-Image's blocks alike
# (transformer_blocks.N.attn.*): FLUX's single blocks, SD3's own names and SD3.5's second image
# attention (attn2), Qwen-Image's img_mlp / txt_mlp tell them apart.
_DIFFUSERS_JOINT_KEY = re.compile(r"(?:^|(?<!single)[._])transformer[._]blocks[._]\d+[._]attn[._]")
_SD3_KEY = re.compile(r"joint[._]blocks|(?:^|[._])transformer[._]blocks[._]\d+[._]attn2[._]")


def _architecture_from_metadata(metadata: Mapping[str, str]) -> str | None:
    # A known family's own id or file labels first (what this pack and the stock tools write),
    # then words that other tools' labels contain.
    if metadata.get("tlora.architecture") in families.ids():
        return metadata["tlora.architecture"]
    for family in families.all_families():
        if any(metadata.get(k) == v for k, v in family.file_labels.items()):
            return family.id
    text = " ".join(metadata.get(k, "") for k in (
        "tlora.architecture", "modelspec.architecture", "ss_base_model_version")).lower()
    for needle, arch in (("flux", "flux"), ("xl", "sdxl"), ("sd3", "sd3"),
                         ("stable-diffusion-3", "sd3"), ("v1", "sd1"), ("v2", "sd1")):
        if needle in text:
            return arch
    return None


def guess_file_architecture(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
    """Which architecture a file looks made for: a key of :data:`ARCHITECTURE_LABELS`.

    Metadata (``tlora.architecture``, ``modelspec.architecture``, ``ss_base_model_version``) wins;
    otherwise the keys vote: a family's own hint (``Family.file_key_hint``) first, then block names
    (FLUX ``double_blocks`` / diffusers ``single_transformer_blocks``, SD3 ``joint_blocks`` /
    diffusers ``attn2``, LDM / diffusers UNet names); diffusers' ``transformer_blocks.N.attn`` go
    with the other keys of the one family that spells joint blocks so (FLUX, SD3, Qwen-Image), and
    are ``"diffusers-joint"`` when nothing else tells.
    """
    found = _architecture_from_metadata(metadata or {})
    if found:
        return found
    votes: Counter[str] = Counter()
    joint = 0
    for key in keys:
        hinted = next((family for family, hint in _HINTS if hint.search(key)), None)
        if hinted is not None:
            votes[hinted] += 1
        elif _UNET_KEY.search(key):
            votes["sd1" if _SD1_KEY.search(key) else "sdxl"] += 1
        elif _SD3_KEY.search(key):
            votes["sd3"] += 1
        elif _DIFFUSERS_JOINT_KEY.search(key):
            joint += 1
        elif _FLUX_KEY.search(key):
            votes["flux"] += 1
        elif _TE_KEY.search(key):
            votes["text-encoder"] += 1
    if votes["sd1"]:
        # One SD 1.x-only block is enough: SDXL files never contain it.
        votes["sd1"] += votes.pop("sdxl", 0)
    if joint:
        # The file's other keys say whose joint blocks these are, if only one such family has any.
        sides = [f.id for f in _JOINT if votes[f.id] > 0]
        votes[sides[0] if len(sides) == 1 else "diffusers-joint"] += joint
    return votes.most_common(1)[0][0] if votes else "unknown"


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise if any floating tensor holds NaN or Inf, naming the first such key."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise TLoRAFileError(
                f"{source}: tensor '{key}' contains {bad} NaN/Inf value(s) of {tensor.numel()}. "
                "The training diverged or the file is damaged; use an earlier checkpoint or "
                "retrain with a lower learning rate.")


def _no_match_message(source: str, names: Sequence[str], inventory: Inventory,
                      file_arch: str) -> str:
    model_arch = detect_architecture(inventory)
    sample = ", ".join(f"'{n}'" for n in list(names)[:4]) or "(no LoRA keys at all)"
    return (f"{source}: none of its layers matches a layer of this model. The file looks made for "
            f"{ARCHITECTURE_LABELS.get(file_arch, file_arch)}; the model is "
            f"{ARCHITECTURE_LABELS.get(model_arch, model_arch)}. First keys: {sample}. "
            "Load it on the model it was trained for, or pick the file made for this model.")


def _check_adapter_shapes(source: str, module: str, group: list, shape: tuple[int, int]) -> None:
    out_features, in_features = shape
    for adapter in group:
        if adapter.out_rows is None:
            rows_fit = adapter.up.shape[0] == out_features
        else:
            rows_fit = 0 <= adapter.out_rows[0] < adapter.out_rows[1] <= out_features
        if adapter.in_features != in_features or not rows_fit:
            rows = "" if adapter.out_rows is None else f" on output rows {adapter.out_rows}"
            raise TLoRAFileError(
                f"{source}: shape mismatch on layer '{module}': the model expects "
                f"(out={out_features}, in={in_features}), the file has down "
                f"{tuple(adapter.down.shape)} and up {tuple(adapter.up.shape)}{rows}. "
                "The file was made for a model of another size (e.g. another base model); "
                "use the file made for this one.")


def _check_adapter_values(source: str, module: str, group: list) -> None:
    for adapter in group:
        check_finite({f"{module}.down": adapter.down, f"{module}.up": adapter.up}, source)
        if adapter.schedule is not None and adapter.rank_index.numel():
            low, high = int(adapter.rank_index.min()), int(adapter.rank_index.max())
            if low < 0 or high >= adapter.schedule.rank:
                raise TLoRAFileError(
                    f"{source}: inconsistent rank grouping on layer '{module}': rank indices "
                    f"{low}..{high} do not fit rank {adapter.schedule.rank}. The file's metadata "
                    "does not match its tensors; re-save it with this pack.")


def validate_weights(weights: TLoRAWeights, inventory: Inventory, source: str, *,
                     file_keys: Sequence[str] = (), unmatched_keys: Sequence[str] = ()) -> TLoRAWeights:
    """Check ``weights`` against the model's inventory; return a copy without unmatched layers.

    Args:
        weights: what a reader produced (adapters keyed by module path).
        inventory: the target model's Linear layers.
        source: the file's name, used in every message.
        file_keys: the file's raw keys (quoted when nothing matches, and for the architecture guess).
        unmatched_keys: file keys the reader already could not map to any module.
    Raises:
        TLoRAFileError: nothing matches, a shape does not fit, a tensor is NaN/Inf, or the rank
            grouping contradicts the schedule.
    A partial match logs a warning with counts and records it in ``weights.warnings``.
    """
    if not inventory:
        raise ValueError("the model inventory is empty: no Linear layers to apply a LoRA to")
    matched = {m: g for m, g in weights.adapters.items() if m in inventory}
    unmatched = list(unmatched_keys) + [m for m in weights.adapters if m not in inventory]
    if not matched:
        file_arch = guess_file_architecture(list(file_keys) or unmatched, weights.metadata)
        raise TLoRAFileError(_no_match_message(source, unmatched or list(file_keys), inventory,
                                               file_arch))
    for module, group in matched.items():
        _check_adapter_shapes(source, module, group, inventory[module])
        _check_adapter_values(source, module, group)
    warnings = list(weights.warnings)
    if unmatched:
        total = len(matched) + len(unmatched)
        message = (f"{source}: {len(unmatched)} of {total} entries match no layer of this "
                   f"{ARCHITECTURE_LABELS[detect_architecture(inventory)]} model and are ignored "
                   f"(e.g. {', '.join(unmatched[:3])}); the other {len(matched)} layers are applied.")
        log.warning(message)
        warnings.append(message)
    return replace(weights, adapters=matched, warnings=warnings)
