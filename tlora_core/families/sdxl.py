"""SDXL: ComfyUI's LDM UNet with a pooled-text / size embedding, discrete eps sampling."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..inventory import Inventory
from . import unet_names
from ._spec import Family, Recipe, ReferenceFiles

# The reference code's SDXL file (diffusers save_attn_procs): per attention processor and
# projection, Ortho (q_layer / p_layer / lambda_layer and the saved frozen base_*) or vanilla.
REFERENCE_FILES = ReferenceFiles(
    format="reference-sdxl",
    key=re.compile(
        r"^(?:unet\.)?(?P<layer>(?:(?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)"
        r"\.transformer_blocks\.\d+\.attn[12])\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\."
        r"(?P<param>q_layer\.weight|p_layer\.weight|lambda_layer|base_q\.weight|base_p\.weight|"
        r"base_lambda|down\.weight|up\.weight)$"),
    layer_name=lambda layer, proj: f"{layer}.{'to_out.0' if proj == 'to_out' else proj}",
    kinds={"ortho": frozenset({"q_layer.weight", "p_layer.weight", "lambda_layer", "base_q.weight",
                               "base_p.weight", "base_lambda"}),
           "vanilla": frozenset({"down.weight", "up.weight"})},
    recipe="min_rank 32 of rank 64",
    vanilla_note="Old diffusers attention-processor LoRAs use the same keys; if this file is a "
                 "plain LoRA, load it as one (no rank schedule).")


def _is_sdxl_unet(inventory: Inventory) -> bool:
    # The LDM UNet with a pooled-text/size embedding (label_emb); SD 1.x has none.
    return any(p.startswith("input_blocks.") for p in inventory) and "label_emb.0.0" in inventory


def _conditioning_widths(unet_config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    adm = unet_config.get("adm_in_channels")
    # The pooled CLIP-G vector is followed by six 256-wide size / crop embeddings.
    return unet_config.get("context_dim"), adm - 6 * 256 if adm else None


FAMILY = Family(
    id="sdxl",
    label="SDXL",
    description="an SDXL UNet",
    model_classes=("SDXL",),
    recognise_inventory=_is_sdxl_unet,
    timestep="discrete",
    latent_channels=4,
    pooled_output=True,
    layers=unet_names.ATTENTION_AND_FF,   # 560 attention Linears at full size
    recipe=Recipe(
        variant="tlora", rank=64,
        why="SDXL: T-LoRA (Ortho init + mask) at rank 64, min_rank 32, the paper's recipe."),
    file_labels={"modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                 "ss_base_model_version": "sdxl_base_v1-0"},
    foreign_names=unet_names.diffusers_names,
    conditioning_widths=_conditioning_widths,
    checkpoint_blocks=unet_names.CHECKPOINT_BLOCKS,
    # The unet config ComfyUI detects from sd_xl_base_1.0 (comfy/model_detection.py).
    real_config={
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
    position=10,
    reference_files=REFERENCE_FILES,
)
