"""FLUX.1: ComfyUI's BFL transformer (double + single blocks, fused qkv), flow sampling.

``model_base.Flux2`` and ``model_base.Chroma`` subclass ``model_base.Flux`` but are other families:
recognition by exact class name keeps them out of this one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..inventory import Inventory
from . import bfl_names
from ._spec import Family, Recipe, ReferenceFiles

# The reference code's FLUX processor projections -> diffusers names (its context projections
# to_{q,k,v}_proj are diffusers' add_{q,k,v}_proj).
_REFERENCE_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0",
                   "to_q_proj": "add_q_proj", "to_k_proj": "add_k_proj", "to_v_proj": "add_v_proj"}


def _never_applied(layer: str, proj: str) -> str | None:
    if layer.startswith("single_") and proj not in ("to_q", "to_k", "to_v"):
        return ("single-block adapters the reference code creates but never applies "
                "(its single blocks have no output or context projection)")
    return None


# The reference code's FLUX file (lora.pt, or the same keys in safetensors): vanilla T-LoRA per
# attention processor, q / k / v landing on rows of the fused qkv / linear1.
REFERENCE_FILES = ReferenceFiles(
    format="reference-flux",
    key=re.compile(
        r"^(?:transformer\.)?(?P<layer>(?:single_)?transformer_blocks\.\d+\.attn)\.processor\."
        r"(?P<proj>to_q|to_k|to_v|to_out|to_q_proj|to_k_proj|to_v_proj)_lora\."
        r"(?P<param>down\.weight|up\.weight)$"),
    layer_name=lambda layer, proj: f"{layer}.{_REFERENCE_PROJ[proj]}",
    kinds={"vanilla": frozenset({"down.weight", "up.weight"})},
    recipe="min_rank 1 of rank 32",
    skip=_never_applied)


def _is_flux1(inventory: Inventory) -> bool:
    # The BFL transformer's block names; Chroma's has the same ones and its own guidance
    # approximator (distilled_guidance_layer), FLUX.2's its shared modulations
    # (double_stream_modulation_img / _txt, single_stream_modulation), which FLUX.1 lacks.
    return any(p.startswith(("double_blocks.", "single_blocks.")) for p in inventory) and \
        not any(p.startswith(("distilled_guidance_layer.", "double_stream_modulation_", "single_stream_modulation."))
                for p in inventory)


def _conditioning_widths(unet_config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    return unet_config.get("context_in_dim"), unet_config.get("vec_in_dim")


FAMILY = Family(
    id="flux",
    label="FLUX",
    description="a FLUX transformer",
    model_classes=("Flux",),
    recognise_inventory=_is_flux1,
    timestep="flow",
    latent_channels=16,
    pooled_output=True,
    # The reference code's layers (see bfl_names.ATTENTION_AND_FF).
    layers=bfl_names.ATTENTION_AND_FF,
    recipe=Recipe(
        variant="vanilla", rank=32, needs_checkpointing=True, training_guidance=1.0,
        why="FLUX: Vanilla T-LoRA at rank 32, the only way the reference code trains FLUX (its "
            "script uses min_rank 1; the default here is the paper's half)."),
    file_labels={"modelspec.architecture": "flux-1-dev/lora", "ss_base_model_version": "flux1"},
    foreign_names=bfl_names.diffusers_names,
    conditioning_widths=_conditioning_widths,
    checkpoint_blocks=bfl_names.CHECKPOINT_BLOCKS,
    # FLUX.1-dev as ComfyUI detects it (19 double blocks, 38 single blocks, hidden 3072).
    real_config={
        "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
        "patch_size": 2, "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072,
        "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
        "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
    },
    diffusers_joint_blocks=True,
    position=20,
    reference_files=REFERENCE_FILES,
)
