"""Checks applied to every T-LoRA / LoRA file before anything of it is used.

Contract: :func:`tlora_core.files.read.load_tlora_file` either returns a :class:`TLoRAWeights`
whose every adapter fits a Linear layer of the target model, or raises :class:`TLoRAFileError`
(a ``ValueError``) whose message names the file, says what is wrong and what to do. Nothing is
returned half-checked, so nothing is half-applied.

What is checked, in order: the file's tensors as read (:func:`check_file_tensors`: floating
dtypes only, float8 up-cast to float32, no empty tensor, every value finite, every ``.alpha`` one
number >= 0; a reader refuses an alpha of 0 with :func:`alpha_value`), then the adapters a reader
made against the model (:func:`validate_weights`: something matches, every shape fits, the rank
grouping fits the schedule). The target model is described by its inventory
(:mod:`tlora_core.inventory`); what a file looks made for, for the message when nothing fits, is
:mod:`.describe`'s to say.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from .. import families
from ..inventory import Inventory
from ..weights import TLoRAWeights
from .describe import ARCHITECTURE_LABELS, no_match_message

log = logging.getLogger(__name__)

# Stored float8 LoRA tensors exist (fp8 checkpoints' LoRAs); every float8 value is exactly a
# float32 value, so they are up-cast before any check or arithmetic (torch has none for float8).
FLOAT8_DTYPES = tuple(getattr(torch, name) for name in (
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, name))
ALPHA_SUFFIX = ".alpha"


class TLoRAFileError(ValueError):
    """A LoRA / T-LoRA file that cannot be used; the message names the file and the fix."""


def detect_architecture(inventory: Inventory) -> str:
    """The id of the family whose module names the inventory shows, or ``"unknown"``."""
    try:
        return families.from_inventory(inventory).id
    except families.UnknownFamily:
        return "unknown"


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise if any floating tensor holds NaN or Inf, naming the first such key."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise TLoRAFileError(
                f"{source}: tensor '{key}' contains {bad} NaN/Inf value(s) of {tensor.numel()}. "
                "The training diverged or the file is damaged; use an earlier checkpoint or "
                "retrain with a lower learning rate.")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checked_tensor(key: str, tensor: torch.Tensor, source: str) -> torch.Tensor:
    if tensor.dtype in FLOAT8_DTYPES:
        tensor = tensor.float()
    elif not tensor.is_floating_point():
        what = "an alpha is one floating-point number such as 8.0" if key.endswith(ALPHA_SUFFIX) \
            else "LoRA weights are floating-point numbers"
        raise TLoRAFileError(
            f"{source}: tensor '{key}' is stored as {_dtype_name(tensor.dtype)}, but {what} "
            "(float32, float16, bfloat16 or float8). The file is damaged or holds something else; "
            "save or download it again.")
    if key.endswith(ALPHA_SUFFIX) and tensor.numel() != 1:
        raise TLoRAFileError(
            f"{source}: tensor '{key}' holds {tensor.numel()} values (shape "
            f"{tuple(tensor.shape)}), but an alpha is one number. The file is damaged; save or "
            "download it again.")
    if tensor.numel() == 0:
        raise TLoRAFileError(
            f"{source}: tensor '{key}' is empty (shape {tuple(tensor.shape)}): a layer of rank 0, "
            "which no loader can apply. The file is damaged or was written by a faulty tool; save "
            "or download it again.")
    return tensor


def check_file_tensors(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The file's tensors as readers may use them, float8 ones up-cast to float32.

    Raises:
        TLoRAFileError: naming the first key that is not floating point (integers, bool,
            complex), is empty (a rank-0 layer), holds NaN / Inf, is an alpha of more than one
            value, or is a negative alpha (readers check more: :func:`alpha_value`).
    """
    out = {key: _checked_tensor(key, tensor, source) for key, tensor in tensors.items()}
    check_finite(out, source)
    for key, tensor in out.items():
        if key.endswith(ALPHA_SUFFIX) and float(tensor) < 0:
            raise TLoRAFileError(
                f"{source}: tensor '{key}' is {float(tensor):g}, but an alpha is never negative "
                "(the layer's scale is alpha / rank). The file is damaged; save or download it again.")
    cast = sum(t.dtype in FLOAT8_DTYPES for t in tensors.values())
    if cast:
        log.info("%s: %d float8 tensor(s) up-cast to float32", source, cast)
    return out


def alpha_value(tensor: torch.Tensor, key: str, source: str) -> float:
    """The value of a checked (:func:`check_file_tensors`) alpha tensor; raises TLoRAFileError
    for 0, which kohya reads as alpha = rank and ComfyUI's stock loader as no effect."""
    value = float(tensor)
    if value == 0:
        raise TLoRAFileError(
            f"{source}: tensor '{key}' is 0. kohya's tools read an alpha of 0 as alpha = rank, "
            "ComfyUI's LoRA loader as 'no effect at all', so the file means different things to "
            "different loaders. Re-save it with the alpha it was trained with (usually its rank).")
    return value


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
        raise TLoRAFileError(no_match_message(source, list(file_keys) or unmatched,
                                              detect_architecture(inventory), weights.metadata,
                                              shown=unmatched or list(file_keys)))
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
