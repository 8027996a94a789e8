"""FLUX.2: ComfyUI's BFL transformer in its FLUX.2 configuration (``image_model "flux2"``), flow
sampling, 128 latent channels, no pooled vector.

``model_base.Flux2`` subclasses ``model_base.Flux`` (recognition by exact class name keeps the two
apart). Its diffusion model is FLUX.1's class with FLUX.1's block classes, so the fused layers,
their names in files and the in-place updates (hence checkpointing) are FLUX.1's; what differs:
shared modulations (``double_stream_modulation_img/txt``, ``single_stream_modulation``) instead of
per-block ones, SwiGLU MLPs (``img_mlp.0`` and the MLP rows of ``linear1`` are gate + up, 6h
rows), no biases, no ``vector_in``. The pack writes all adapters of one fused module as one
block-diagonal ``lora_unet_`` pair, so ComfyUI's FLUX.1-width ``proj_mlp`` alias never comes into it.

FLUX.2 dev is the real config; Klein 4B / 9B (same class, no guidance embedder, 128-wide heads) are
other real configs. ComfyUI 0.3.75's detection gives every FLUX.2 checkpoint 48 heads and fails
to build Klein, so only newer ComfyUI (0.33) loads Klein.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..inventory import Inventory
from . import bfl_names
from ._spec import Family, Recipe

# The shared modulation only the FLUX.2 configuration of the BFL transformer has.
GLOBAL_MODULATION = "double_stream_modulation_img.lin"


def _detected(**sizes: Any) -> dict[str, Any]:
    """A FLUX.2 unet config as ComfyUI's model detection gives it, at these sizes (newer ComfyUI
    adds txt_ids_dims [3], which 0.3.75's FluxParams does not accept: see the tiny test config)."""
    return {
        "image_model": "flux2", "axes_dim": [32, 32, 32, 32], "mlp_ratio": 3.0, "theta": 2000,
        "out_channels": 128, "global_modulation": True, "mlp_silu_act": True, "qkv_bias": False,
        "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0, "patch_size": 1,
        "in_channels": 128, "vec_in_dim": None, **sizes,
    }


def _is_flux2(inventory: Inventory) -> bool:
    return GLOBAL_MODULATION in inventory and "single_blocks.0.linear1" in inventory


def _conditioning_widths(unet_config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    return unet_config.get("context_in_dim"), None


FAMILY = Family(
    id="flux2",
    label="FLUX.2",
    description="a FLUX.2 transformer",
    model_classes=("Flux2",),
    recognise_inventory=_is_flux2,
    timestep="flow",
    latent_channels=128,
    latent_downscale=16,   # 128 channels: the VAE's 32 at 1/8, patchified 2x2
    pooled_output=False,
    # FLUX.1's rule: the blocks are FLUX.1's classes (see bfl_names.ATTENTION_AND_FF).
    layers=bfl_names.ATTENTION_AND_FF,
    recipe=Recipe(
        variant="vanilla", rank=16, needs_checkpointing=True, training_guidance=1.0,
        why="FLUX.2: Vanilla T-LoRA at rank 16, a starting point, not the paper's recipe: FLUX.2 is "
            "FLUX-like and the reference FLUX script trains Vanilla T-LoRA; rank 16 because the 32B "
            "dev base already gives ~40 M adapter parameters at rank 16 (common FLUX.2 trainers "
            "start at small ranks, lr 1e-4); trained at guidance 1.0 like FLUX.1-dev."),
    file_labels={"modelspec.architecture": "flux-2-dev/lora", "ss_base_model_version": "flux2"},
    foreign_names=bfl_names.diffusers_names,
    conditioning_widths=_conditioning_widths,
    checkpoint_blocks=bfl_names.CHECKPOINT_BLOCKS,
    # FLUX.2 dev as ComfyUI's model detection gives it (8 double, 48 single blocks, hidden 6144,
    # 48 heads of 128, text width 3 x 5120 of Mistral-3 24B).
    real_config=_detected(hidden_size=6144, num_heads=48, context_in_dim=15360, depth=8,
                          depth_single_blocks=48, guidance_embed=True),
    # Klein (newer ComfyUI only): text width 3 x the Qwen3 4B / 8B hidden size, no guidance input.
    other_real_configs={
        "klein-4b": _detected(hidden_size=3072, num_heads=24, context_in_dim=7680, depth=5,
                              depth_single_blocks=20, guidance_embed=False),
        "klein-9b": _detected(hidden_size=4096, num_heads=32, context_in_dim=12288, depth=8,
                              depth_single_blocks=24, guidance_embed=False),
    },
    position=22,
)
