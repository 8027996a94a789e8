"""Layer names in LoRA files, mapped onto the modules of one ComfyUI diffusion model.

Contract. Given a model's inventory (:mod:`tlora_core.inventory`) and its family
(:mod:`tlora_core.families`), :class:`ModuleIndex` resolves any known spelling of a layer name to a
:class:`~tlora_core.inventory.Target`: the model's own paths, the family's foreign spellings
(``Family.foreign_names``: diffusers names and the like, family by family), and both flattened
with underscores as kohya (``lora_unet_<path with _>``) and LyCORIS (``lycoris_<path with _>``)
write them; since ``_`` cannot be split back, every known name is flattened the same way.
:func:`split_lora_key` and :func:`strip_prefix` take a plain LoRA key apart.
"""

from __future__ import annotations

import re

from .. import families
from ..families import Family
from ..inventory import Inventory, Target


def flatten(name: str) -> str:
    """kohya / LyCORIS spelling of a module name: dots become underscores."""
    return name.replace(".", "_")


class ModuleIndex:
    """Resolves any known spelling of a layer name to a :class:`Target` of one model.

    Accepted spellings: the model's own paths, the family's foreign names, and both flattened with
    underscores. Prefixes such as ``lora_unet_`` are the caller's to strip. ``family`` defaults to
    the one the inventory's module names show (ValueError if none).
    """

    def __init__(self, inventory: Inventory, family: Family | None = None) -> None:
        self.inventory = dict(inventory)
        self.family = family or families.from_inventory(self.inventory)
        self.dotted: dict[str, Target] = {p: Target(p) for p in self.inventory}
        self.dotted.update(self.family.foreign_names(self.inventory))
        self.flat: dict[str, Target | None] = {}
        for name, target in self.dotted.items():
            key = flatten(name)
            # Two different layers flattening alike would be ambiguous: refuse both.
            self.flat[key] = target if self.flat.get(key, target) == target else None

    @property
    def architecture(self) -> str:
        return self.family.id

    def resolve(self, name: str) -> Target | None:
        """Target of a dotted or underscore-flattened layer name, or None."""
        target = self.dotted.get(name)
        return target if target is not None else self.flat.get(name)

    def shape(self, target: Target) -> tuple[int, int]:
        """``(out, in)`` the adapter must match (``out`` = the slice's rows on a fused layer)."""
        out, in_features = self.inventory[target.module]
        if target.out_rows is None:
            return out, in_features
        return target.out_rows[1] - target.out_rows[0], in_features


# Plain LoRA key spellings: (suffix, part). Longest first where one ends another.
_LORA_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),     # diffusers attention processors
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),     # kohya, ComfyUI
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),         # peft / diffusers
    (".alpha", "alpha"), (".lora_mid.weight", "mid"), (".dora_scale", "dora"),
)
MODEL_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_", "model.diffusion_model.",
                  "diffusion_model.", "base_model.model.", "unet.", "transformer.")
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_model", "te1.", "te2.", "te.", "lora_clip",
                         "clip_", "t5")


def split_lora_key(key: str) -> tuple[str, str] | None:
    """``(layer name, part)`` of a plain LoRA key, part in down / up / alpha / mid / dora; or None.

    The layer name keeps its prefix (``lora_unet_``, ``unet.``, ...); see :func:`strip_prefix`.
    """
    for suffix, part in _LORA_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            name = key[:-len(suffix)]
            if suffix.startswith("_lora."):
                # diffusers' old processor spelling: `<attn>.processor.to_out` is `<attn>.to_out.0`
                name = re.sub(r"\.processor\.(to_q|to_k|to_v|to_out)$",
                              lambda m: f".{m.group(1)}" + (".0" if m.group(1) == "to_out" else ""),
                              name)
            return name, part
    return None


def strip_prefix(name: str) -> tuple[str, bool]:
    """``(name without its model prefix, is_text_encoder)``."""
    if name.startswith(TEXT_ENCODER_PREFIXES):
        return name, True
    for prefix in MODEL_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):], False
    return name, False
