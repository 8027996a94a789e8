"""SD 1.5: ComfyUI's LDM UNet without SDXL's pooled-text / size embedding, discrete eps sampling.

Its ``model_base`` class is the plain ``BaseModel`` (as for SD 2.x and others), so the config
class ``SD15`` tells it apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..inventory import Inventory
from . import unet_names
from ._spec import Family, Recipe


def _is_sd15_unet(inventory: Inventory) -> bool:
    # An LDM UNet (time embedding, input blocks) without SDXL's pooled-text / size embedding.
    return "time_embed.0" in inventory and "label_emb.0.0" not in inventory and any(
        p.startswith("input_blocks.") for p in inventory)


def _conditioning_widths(unet_config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    return unet_config.get("context_dim"), None


FAMILY = Family(
    id="sd15",
    label="SD 1.5",
    description="an SD 1.5 UNet",
    model_classes=("BaseModel",),
    config_classes=("SD15",),
    recognise_inventory=_is_sd15_unet,
    timestep="discrete",
    latent_channels=4,
    pooled_output=False,
    layers=unet_names.ATTENTION_AND_FF,   # proj_in / proj_out are 1x1 convolutions here
    recipe=Recipe(
        variant="tlora", rank=32,
        why="SD 1.5: T-LoRA at rank 32, the paper's SDXL recipe scaled to a UNet with a quarter "
            "of SDXL's attention parameters (community SD 1.5 LoRAs use 16-32)."),
    file_labels={"modelspec.architecture": "stable-diffusion-v1/lora", "ss_base_model_version": "sd_v1"},
    foreign_names=unet_names.diffusers_names,
    conditioning_widths=_conditioning_widths,
    checkpoint_blocks=unet_names.CHECKPOINT_BLOCKS,
    # The unet config ComfyUI detects from an SD 1.5 checkpoint (comfy/model_detection.py).
    real_config={
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
    position=30,
)
