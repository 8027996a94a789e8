"""Qwen-Image (and Qwen-Image-Edit): ComfyUI's ``QwenImageTransformer2DModel``, flow sampling, 5-D
latents, no pooled vector.

``model_base.QwenImage`` (newer ComfyUI derives other models from it, such as ``MageFlow`` with
its own transformer: recognition by exact class name does not take them for Qwen-Image). Its 60
``transformer_blocks`` are joint (MMDiT) blocks with diffusers' names and nothing fused: image
attention ``attn.to_q / to_k / to_v / to_out.0``, text attention ``attn.add_q_proj / add_k_proj /
add_v_proj / to_add_out``, one joint attention over both; feed-forwards ``img_mlp`` / ``txt_mlp``
(``net.0.proj`` in, ``net.2`` out). The model discards the text stream after the last block, so that block's text
query, text output projection and text MLP never reach the output (zero gradient): they are not
targets (its text keys and values still feed the image queries and are).

Latents are (B, 16, T, H, W) with one frame for images (the Wan 2.1 VAE's format). The model
sampling (shift 1.15, multiplier 1) gives ``timestep(sigma) == sigma`` and the model scales it
by 1000 itself: the rank schedule uses the pack's flow rule ``t = 1000 * sigma``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..inventory import Inventory
from ._spec import Family, Layers, Recipe, no_foreign_names

_BLOCK = r"^transformer_blocks\.\d+\."
# QwenImageTransformer2DModel's default text width (Qwen2.5-VL 7B hidden states); ComfyUI's model
# detection does not set it.
_TEXT_WIDTH = 3584


def _before_last_block(path: str, inventory: Inventory) -> bool:
    # Another block follows this one: its text stream's output is used.
    index = int(path.split(".", 2)[1])
    return f"transformer_blocks.{index + 1}.attn.to_q" in inventory


def _is_qwen_image(inventory: Inventory) -> bool:
    return "transformer_blocks.0.attn.add_q_proj" in inventory and \
        "transformer_blocks.0.img_mlp.net.0.proj" in inventory and "txt_in" in inventory


def _conditioning_widths(unet_config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    return unet_config.get("joint_attention_dim", _TEXT_WIDTH), None


FAMILY = Family(
    id="qwen_image",
    label="Qwen-Image",
    description="a Qwen-Image transformer",
    model_classes=("QwenImage",),
    recognise_inventory=_is_qwen_image,
    timestep="flow",
    latent_channels=16,
    latent_ndim=5,
    pooled_output=False,
    # The eight attention projections of every joint block (image and text), but the last block's
    # text query and text output; attention+ff adds both feed-forwards (not the last text one).
    # The adaLN modulations (img_mod, txt_mod), embedders and the final layer are never targets.
    layers=(
        Layers(_BLOCK + r"attn\.(to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj)$"),
        Layers(_BLOCK + r"attn\.(add_q_proj|to_add_out)$", when=_before_last_block),
        Layers(_BLOCK + r"img_mlp\.net\.(0\.proj|2)$", scope="ff"),
        Layers(_BLOCK + r"txt_mlp\.net\.(0\.proj|2)$", scope="ff", when=_before_last_block),
    ),
    recipe=Recipe(
        variant="tlora", rank=16,   # min_rank: the paper's half, 8
        why="Qwen-Image: T-LoRA (Ortho init + mask) at rank 16, min_rank 8, not the paper's recipe "
            "(it has none for Qwen-Image) but common trainers' starting point for Qwen-Image LoRAs "
            "(rank 16-32, lr 1e-4 AdamW): the 20B base with 60 joint blocks already gives ~47 M "
            "adapter parameters at rank 16; CFG stays real at sampling (no distilled guidance)."),
    # No published modelspec id for Qwen-Image LoRAs is known to the pack: its own spelling.
    file_labels={"modelspec.architecture": "qwen-image/lora", "ss_base_model_version": "qwen_image"},
    # ComfyUI's module paths are diffusers' names already.
    foreign_names=no_foreign_names,
    conditioning_widths=_conditioning_widths,
    checkpoint_blocks=("QwenImageTransformerBlock",),
    # Qwen-Image (20B; Qwen-Image-Edit / 2509 / 2511 share it) as ComfyUI's model detection gives
    # it: 60 blocks of 24 heads x 128, the class defaults for the rest.
    real_config={"image_model": "qwen_image", "in_channels": 64, "num_layers": 60},
    file_key_hint=r"[._](img|txt)_(mlp|mod)[._]",
    diffusers_joint_blocks=True,
    position=35,
)
