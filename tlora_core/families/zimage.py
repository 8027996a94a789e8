"""Z-Image (Turbo / Base): ComfyUI's Lumina 2 ``NextDiT`` with Z-Image's modulation, flow sampling.

``model_base.Lumina2`` is also Lumina-Image-2.0's class; the config class ``ZImage`` (ComfyUI
matches it on ``dim`` 3840) tells Z-Image apart, never the width alone. Three stacks of
``JointTransformerBlock`` share one layout: ``noise_refiner.N`` (image tokens), ``context_refiner.N``
(text tokens, no adaLN) and ``layers.N`` (the joint single-stream sequence). Each attention has a
fused ``qkv`` Linear, rows ``[q | k | v]`` of ``dim`` each (Z-Image has as many key / value heads as
query heads; Lumina 2's grouped heads would not split in thirds), and an ``out`` projection; the
feed-forward is a SwiGLU (``w1``, ``w3`` in, ``w2`` out).

The model multiplies the sigma it is given by its ``time_scale`` (1000) itself: its model sampling
(shift 3, multiplier 1) gives ``timestep(sigma) == sigma``, so the rank schedule uses the pack's
flow rule ``t = 1000 * sigma``, not that timestep.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..inventory import Inventory, Target
from ._spec import Family, Layers, Recipe, thirds

_STACKS = ("noise_refiner", "context_refiner", "layers")
_STACK = r"^(noise_refiner|context_refiner|layers)\.\d+\."

# Diffusers' Z-Image names inside a block (ComfyUI maps the same ones for every Lumina 2 model):
# -> (module, third of the fused qkv rows or None).
_DIFFUSERS = {"attention.to_q": ("attention.qkv", 0), "attention.to_k": ("attention.qkv", 1),
              "attention.to_v": ("attention.qkv", 2), "attention.to_out.0": ("attention.out", None),
              "feed_forward.w1": ("feed_forward.w1", None), "feed_forward.w2": ("feed_forward.w2", None),
              "feed_forward.w3": ("feed_forward.w3", None)}


def _is_zimage(inventory: Inventory) -> bool:
    # Lumina 2's layout (caption embedder, refiners) with q, k and v of equal width.
    qkv = inventory.get("layers.0.attention.qkv")
    return "cap_embedder.1" in inventory and "context_refiner.0.attention.qkv" in inventory and \
        qkv is not None and qkv[0] == 3 * qkv[1]


def _diffusers_names(inventory: Inventory) -> Mapping[str, Target]:
    names = {}
    for path, (out, _in) in inventory.items():
        parts = path.split(".", 2)
        if len(parts) < 3 or parts[0] not in _STACKS:
            continue
        block = f"{parts[0]}.{parts[1]}"
        for name, (module, third) in _DIFFUSERS.items():
            if parts[2] == module:
                rows = None if third is None else (third * out // 3, (third + 1) * out // 3)
                names[f"{block}.{name}"] = Target(path, rows)
    return names


def _conditioning_widths(unet_config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    return unet_config.get("cap_feat_dim"), None


FAMILY = Family(
    id="zimage",
    label="Z-Image",
    description="a Z-Image transformer",
    model_classes=("Lumina2",),
    config_classes=("ZImage",),
    recognise_inventory=_is_zimage,
    timestep="flow",
    latent_channels=16,
    pooled_output=False,
    # q/k/v rows of every fused qkv and each attention's out projection, in all three stacks (as
    # diffusers-trained Z-Image LoRAs cover them); attention+ff adds the SwiGLU's w1 / w2 / w3.
    # adaLN modulations, the embedders and the final layer are never targets.
    layers=(
        Layers(_STACK + r"attention\.qkv$", rows=thirds),
        Layers(_STACK + r"attention\.out$"),
        Layers(_STACK + r"feed_forward\.w[123]$", scope="ff"),
    ),
    recipe=Recipe(
        variant="tlora", rank=32,
        why="Z-Image: T-LoRA (Ortho init + mask) at rank 32, not the paper's recipe (it has none "
            "for Z-Image) but common trainers' starting point for Z-Image LoRAs (rank 16-32, lr "
            "1e-4); Turbo is step-distilled, so train the base model or expect drift."),
    # No published modelspec id for Z-Image LoRAs is known to the pack: its own spelling.
    file_labels={"modelspec.architecture": "z-image/lora", "ss_base_model_version": "zimage"},
    foreign_names=_diffusers_names,
    conditioning_widths=_conditioning_widths,
    checkpoint_blocks=("JointTransformerBlock",),
    # Z-Image Turbo as ComfyUI's model detection gives it (dim 3840, 30 layers + 2 + 2 refiners,
    # 30 heads, Qwen3-4B captions of width 2560, the checkpoint's cap_pad_token).
    real_config={
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560,
        "n_layers": 30, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
        "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32,
    },
    file_key_hint=r"[._]attention[._](qkv|out|to_[qkv]|to_out)(?![a-z])|(context|noise)_refiner|feed_forward[._]w[123]",
    position=40,
)
