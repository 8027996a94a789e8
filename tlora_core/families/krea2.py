"""Krea 2: ComfyUI's single-stream DiT (``comfy.ldm.krea2``), flow sampling, 5-D latents.

ComfyUI 0.33 and later only: older ComfyUI has no ``Krea2`` model class, so no such MODEL can reach
the pack there. Image and text tokens run through one stack of ``blocks.N`` (one attention per
block). Each attention has separate ``wq`` / ``wk`` / ``wv`` / ``wo`` Linears (grouped key / value
heads: ``wk`` and ``wv`` are narrower than ``wq``), nothing fused; ``attn.gate`` (a sigmoid output
gate) is left out as diffusers-trained Krea 2 LoRAs usually leave it. The feed-forward is a SwiGLU
(``mlp.gate``, ``mlp.up`` in, ``mlp.down`` out). The text-fusion transformer inside the diffusion
model (``txtfusion.*``, which merges the text encoder's stacked layers) has blocks with the same
sub-names; the rules are anchored at ``^blocks\\.`` so it is never a target.

Conditioning is ``(B, tokens, txtlayers * txtdim)``: 12 stacked Qwen3-VL hidden states per token,
no pooled vector. Latents are the Wan 2.1 VAE's ``(B, 16, 1, H, W)``. The model sampling is
FLUX's (shift 1.15), whose ``timestep(sigma)`` is sigma itself: the rank schedule uses the pack's
flow rule ``t = 1000 * sigma``. ComfyUI's RoPE runs a kernel without backward unless
``comfy.model_management.in_training`` is set, which the trainer does for every family.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..inventory import Inventory, Target
from ._spec import Family, Layers, Recipe

_BLOCK = r"^blocks\.\d+\."

# Diffusers' Krea 2 names -> ComfyUI's module paths, as ComfyUI's LoRA loader maps them
# (comfy.utils.krea2_to_diffusers): inside every block of the main stack and of the text fusion
# (some tools write to_out without its ".0"), and the embedders and the final layer.
_IN_BLOCK = {"attn.to_q": "attn.wq", "attn.to_k": "attn.wk", "attn.to_v": "attn.wv",
             "attn.to_gate": "attn.gate", "attn.to_out.0": "attn.wo", "attn.to_out": "attn.wo",
             "ff.gate": "mlp.gate", "ff.up": "mlp.up", "ff.down": "mlp.down"}
_STACKS = {"blocks": "transformer_blocks", "txtfusion.layerwise_blocks": "text_fusion.layerwise_blocks",
           "txtfusion.refiner_blocks": "text_fusion.refiner_blocks"}
_OUTSIDE = {"img_in": "first", "time_embed.linear_1": "tmlp.0", "time_embed.linear_2": "tmlp.2",
            "time_mod_proj": "tproj.1", "txt_in.linear_1": "txtmlp.1", "txt_in.linear_2": "txtmlp.3",
            "text_fusion.projector": "txtfusion.projector", "final_layer.linear": "last.linear"}


def _is_krea2(inventory: Inventory) -> bool:
    return "txtfusion.projector" in inventory and "blocks.0.attn.wq" in inventory


def _diffusers_names(inventory: Inventory) -> Mapping[str, Target]:
    names = {name: Target(module) for name, module in _OUTSIDE.items() if module in inventory}
    for ours, theirs in _STACKS.items():
        index = 0
        while f"{ours}.{index}.attn.wq" in inventory:
            for name, module in _IN_BLOCK.items():
                if f"{ours}.{index}.{module}" in inventory:
                    names[f"{theirs}.{index}.{name}"] = Target(f"{ours}.{index}.{module}")
            index += 1
    return names


def _conditioning_widths(unet_config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    # ComfyUI's defaults are the released model's (12 layers of 2560).
    return unet_config.get("txtlayers", 12) * unet_config.get("txtdim", 2560), None


FAMILY = Family(
    id="krea2",
    label="Krea 2",
    description="a Krea 2 single-stream transformer",
    model_classes=("Krea2",),
    recognise_inventory=_is_krea2,
    timestep="flow",
    latent_channels=16,
    latent_ndim=5,
    pooled_output=False,
    # q, k, v and output projection of every block's attention; attention+ff adds the SwiGLU.
    # The text fusion (txtfusion.*), the modulations and the embedders are never targets.
    layers=(
        Layers(_BLOCK + r"attn\.(wq|wk|wv|wo)$"),
        Layers(_BLOCK + r"mlp\.(gate|up|down)$", scope="ff"),
    ),
    recipe=Recipe(
        variant="tlora", rank=16,
        why="Krea 2: T-LoRA (Ortho init + mask) at rank 16, min_rank 8, lr 1e-4 AdamW: no "
            "published recipe exists for this 12.8 B model yet; its blocks are as wide as "
            "FLUX.2 dev's (6144), where rank 16 at lr 1e-4 is the common starting point."),
    # No published modelspec id for Krea 2 LoRAs is known to the pack: its own spelling.
    file_labels={"modelspec.architecture": "krea-2/lora", "ss_base_model_version": "krea2"},
    foreign_names=_diffusers_names,
    conditioning_widths=_conditioning_widths,
    checkpoint_blocks=("SingleStreamBlock",),
    # Krea 2 as ComfyUI's model detection reads it (features 6144, 48 heads, 12 key / value heads,
    # 28 blocks, 12 stacked Qwen3-VL-4B layers of 2560): the model class's defaults.
    real_config={
        "image_model": "krea2", "features": 6144, "channels": 16, "patch": 2, "layers": 28,
        "heads": 48, "kvheads": 12, "txtlayers": 12, "txtdim": 2560,
    },
    min_comfyui="0.33.0",
    file_key_hint=r"[._]attn[._](w[qkvo]|gate|to_gate)(?![a-z])|txtfusion|text_fusion|[._]ff[._](gate|up|down)(?![a-z])",
    position=60,
)
