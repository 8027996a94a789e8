"""Chroma: ComfyUI's BFL FLUX transformer without the pooled vector, modulated by a distilled
guidance approximator; flow sampling.

``model_base.Chroma`` subclasses ``model_base.Flux`` (recognition by exact class name keeps the two
apart). Its blocks are FLUX.1's classes at FLUX.1's widths, so the targets, their names in files
and the in-place updates (hence checkpointing) are FLUX.1's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..inventory import Inventory
from . import bfl_names
from ._spec import Family, Recipe


def _is_chroma(inventory: Inventory) -> bool:
    return "distilled_guidance_layer.in_proj" in inventory and "single_blocks.0.linear1" in inventory


def _conditioning_widths(unet_config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    return unet_config.get("context_in_dim"), None


FAMILY = Family(
    id="chroma",
    label="Chroma",
    description="a Chroma transformer",
    model_classes=("Chroma",),
    recognise_inventory=_is_chroma,
    timestep="flow",
    latent_channels=16,
    pooled_output=False,
    # FLUX.1's rule: the blocks are FLUX.1's. distilled_guidance_layer.* (the modulation
    # approximator) is not attention and never a target.
    layers=bfl_names.ATTENTION_AND_FF,
    recipe=Recipe(
        variant="vanilla", rank=16, needs_checkpointing=True, training_guidance=0.0,
        why="Chroma: Vanilla T-LoRA at rank 16, not the paper's recipe but common trainers' "
            "starting point for Chroma LoRAs (FLUX.1's blocks and widths; rank 16-32, lr 1e-4), "
            "trained at guidance 0, ComfyUI's default for Chroma."),
    file_labels={"modelspec.architecture": "chroma/lora", "ss_base_model_version": "chroma"},
    foreign_names=bfl_names.diffusers_names,
    conditioning_widths=_conditioning_widths,
    checkpoint_blocks=bfl_names.CHECKPOINT_BLOCKS,
    # Chroma1-HD as ComfyUI's model detection gives it (FLUX.1's widths, no vector_in).
    real_config={
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2,
        "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
        "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
        "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5, "txt_ids_dims": [],
        "vec_in_dim": None,
    },
    position=25,
)
