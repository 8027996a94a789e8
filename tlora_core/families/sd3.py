"""SD3 / SD3.5: ComfyUI's MMDiT (joint blocks with fused qkv), flow sampling, a pooled vector.

Per joint block: image (``x_block``) and text (``context_block``) attention, each a fused
``qkv`` Linear (rows ``[q | k | v]``) and a ``proj``; SD3.5-medium adds ``x_block.attn2`` in its
first blocks. The last block's ``context_block`` is ``pre_only``: ``qkv`` but no ``proj`` or MLP.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..inventory import Inventory, Target
from ._spec import Family, Layers, Recipe, thirds


def _has_proj(path: str, inventory: Inventory) -> bool:
    return f"{path.rsplit('.', 1)[0]}.proj" in inventory


def _pre_only(path: str, inventory: Inventory) -> bool:
    # The last block's text attention: its queries' outputs are discarded (no proj), k / v feed
    # the image queries.
    return not _has_proj(path, inventory)


def _key_value(out_features: int, in_features: int) -> list:
    h = out_features // 3
    return [(h, 2 * h), (2 * h, 3 * h)]


def _is_mmdit(inventory: Inventory) -> bool:
    return "joint_blocks.0.context_block.attn.qkv" in inventory


def _conditioning_widths(unet_config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    embedder = unet_config.get("context_embedder_config") or {}
    return embedder.get("params", {}).get("in_features"), unet_config.get("adm_in_channels")


def _no_foreign_names(inventory: Inventory) -> Mapping[str, Target]:
    # Files are read by ComfyUI's module paths (the ones the pack writes, and kohya's
    # lora_unet_ spelling of them); diffusers' SD3 names are not mapped yet.
    return {}


FAMILY = Family(
    id="sd3",
    label="SD3",
    description="an SD3 MMDiT",
    model_classes=("SD3",),
    recognise_inventory=_is_mmdit,
    timestep="flow",
    latent_channels=16,
    pooled_output=True,
    # q/k/v of every attention (three adapters on the rows of each fused qkv) and its output
    # projection, image and text alike (the last text block: k and v only, its queries are dead);
    # attention+ff adds both MLPs.
    layers=(
        Layers(r"^joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.qkv$", rows=thirds, when=_has_proj),
        Layers(r"^joint_blocks\.\d+\.context_block\.attn\.qkv$", rows=_key_value, when=_pre_only),
        Layers(r"^joint_blocks\.\d+\.(x_block|context_block)\.attn2?\.proj$"),
        Layers(r"^joint_blocks\.\d+\.(x_block|context_block)\.mlp\.fc[12]$", scope="ff"),
    ),
    recipe=Recipe(
        variant="tlora", rank=32,
        why="SD3: T-LoRA (Ortho init + mask) at rank 32, not the paper's recipe (it has none for "
            "SD3) but common trainers' starting point for SD3.5 LoRAs (rank 16-32, lr 1e-4)."),
    file_labels={"modelspec.architecture": "stable-diffusion-v3/lora", "ss_base_model_version": "sd3"},
    foreign_names=_no_foreign_names,
    conditioning_widths=_conditioning_widths,
    checkpoint_blocks=("JointBlock",),
    # SD3.5-large as ComfyUI's model detection gives it (38 joint blocks, hidden 2432, RMS qk-norm).
    real_config={
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 38, "input_size": None,
        "adm_in_channels": 2048,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": 4096, "out_features": 2432}},
        "num_patches": 36864, "pos_embed_max_size": 192, "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [], "qk_norm": "rms",
    },
    position=30,
)
