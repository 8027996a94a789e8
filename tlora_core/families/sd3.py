"""SD3 / SD3.5: ComfyUI's MMDiT (joint blocks with fused qkv), flow sampling, a pooled vector.

Per joint block: image (``x_block``) and text (``context_block``) attention, each a fused
``qkv`` Linear (rows ``[q | k | v]``) and a ``proj``; SD3.5-medium adds ``x_block.attn2`` in its
first blocks. The last block's ``context_block`` is ``pre_only``: ``qkv`` but no ``proj`` or MLP.
Diffusers' names (``transformer_blocks.N.attn.to_q`` ...) are read onto the weights and qkv rows
ComfyUI's own key map gives them.
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


# Diffusers' SD3 names inside ``transformer_blocks.N`` -> (module in ``joint_blocks.N``, third of
# the fused qkv rows or None), as ComfyUI maps them (comfy.utils.mmdit_to_diffusers).
_DIFFUSERS_BLOCK = {
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2), "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1), "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", None), "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
    "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
}
_DIFFUSERS_BASIC = {
    "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
}


def _diffusers_names(inventory: Inventory) -> Mapping[str, Target]:
    """Every diffusers name of the inventory's modules -> its target. The qkv rows are the fused
    layer's own thirds (ComfyUI computes them as ``64 * depth``, the same width on every SD3)."""
    names = {name: Target(path) for name, path in _DIFFUSERS_BASIC.items() if path in inventory}
    # diffusers' AdaLayerNormContinuous is [scale | shift], ComfyUI's final modulation [shift | scale]
    if "final_layer.adaLN_modulation.1" in inventory:
        names["norm_out.linear"] = Target("final_layer.adaLN_modulation.1", swap_halves=True)
    depth = len({p.split(".")[1] for p in inventory if p.startswith("joint_blocks.")})
    for i in range(depth):
        for name, (module, third) in _DIFFUSERS_BLOCK.items():
            path = f"joint_blocks.{i}.{module}"
            if path not in inventory:
                continue          # SD3.5-medium's attn2 in its first blocks only; pre_only text
            out = inventory[path][0]
            rows = None if third is None else (third * out // 3, (third + 1) * out // 3)
            # The last (pre_only) text block's modulation is an AdaLayerNormContinuous too.
            swap = name == "norm1_context.linear" and _pre_only(f"joint_blocks.{i}.context_block.attn.qkv",
                                                                inventory)
            names[f"transformer_blocks.{i}.{name}"] = Target(path, rows, swap_halves=swap)
    return names


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
    foreign_names=_diffusers_names,
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
    diffusers_joint_blocks=True,
    position=30,
)
