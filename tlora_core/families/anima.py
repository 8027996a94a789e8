"""Anima: ComfyUI's Cosmos-Predict2 ``MiniTrainDIT`` with a Qwen3-0.6B text adapter, flow
sampling, 5-D latents.

ComfyUI 0.33 and later only: older ComfyUI has no ``Anima`` model class (``model_base.Anima`` is
not a ``CosmosPredict2`` subclass, although the DiT is the same). Every ``blocks.N`` has an image
self-attention and a text cross-attention, each with separate ``q_proj`` / ``k_proj`` / ``v_proj`` /
``output_proj`` Linears (nothing fused), and a two-layer MLP (``mlp.layer1`` / ``layer2``). The text
adapter inside the diffusion model (``llm_adapter.*``, 0.14 B parameters) has blocks with the same
sub-names; the rules are anchored at ``^blocks\\.`` so it is never a target. ComfyUI runs the
adapter when it encodes the conditioning for sampling, but inside the model's forward in training
(``t5xxl_ids`` / ``t5xxl_weights`` are passed on as conditioning): frozen, it costs each training
step a forward, no trained parameters.

Latents are the Wan 2.1 VAE's ``(B, 16, 1, H, W)``; no pooled vector. Its model sampling (shift 3,
multiplier 1) gives ``timestep(sigma) == sigma``, so the rank schedule uses the pack's flow rule
``t = 1000 * sigma``. Training needs one runtime fix (``recipe.runtime_fixes``): the
self-attention always calls comfy_kitchen's fused ``rms_rope_split_half``, which has no backward,
whatever ``in_training`` says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..inventory import Inventory
from ._spec import Family, Layers, Recipe, no_foreign_names

_BLOCK = r"^blocks\.\d+\."


def _is_anima(inventory: Inventory) -> bool:
    return "llm_adapter.blocks.0.cross_attn.q_proj" in inventory and "blocks.0.mlp.layer1" in inventory


def _conditioning_widths(unet_config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    # The text adapter reads Qwen3-0.6B hidden states (1024 wide), as the cross-attention does.
    return unet_config.get("crossattn_emb_channels"), None


FAMILY = Family(
    id="anima",
    label="Anima",
    description="an Anima (Cosmos-Predict2) transformer",
    model_classes=("Anima",),
    recognise_inventory=_is_anima,
    timestep="flow",
    latent_channels=16,
    latent_ndim=5,
    pooled_output=False,
    # q, k, v and output projection of the self- and the cross-attention of every block;
    # attention+ff adds the MLP. The text adapter (llm_adapter.*), the adaLN modulations and the
    # embedders are never targets.
    layers=(
        Layers(_BLOCK + r"(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|output_proj)$"),
        Layers(_BLOCK + r"mlp\.layer[12]$", scope="ff"),
    ),
    recipe=Recipe(
        variant="tlora", rank=32,
        why="Anima: T-LoRA (Ortho init + mask) at rank 32, min_rank 16, lr 1e-4 AdamW: a 2 B DiT "
            "with SDXL's adapter budget at that rank (27.5 M parameters on its attention); "
            "community Anima LoRAs use rank 16-32 at lr 2e-5 to 1e-4.",
        runtime_fixes=("eager_rms_rope_split_half",)),
    # No published modelspec id for Anima LoRAs is known to the pack: its own spelling.
    file_labels={"modelspec.architecture": "anima/lora", "ss_base_model_version": "anima"},
    # Anima LoRAs use ComfyUI's module paths: no diffusers spelling of this model exists.
    foreign_names=no_foreign_names,
    conditioning_widths=_conditioning_widths,
    checkpoint_blocks=("Block",),
    # Anima as ComfyUI's model detection gives it (Cosmos-Predict2 2B: model_channels 2048,
    # 16 heads, 28 blocks, rope3d, with the llm_adapter).
    real_config={
        "image_model": "anima", "max_img_h": 240, "max_img_w": 240, "max_frames": 128,
        "in_channels": 16, "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1,
        "model_channels": 2048, "concat_padding_mask": True, "crossattn_emb_channels": 1024,
        "pos_emb_cls": "rope3d", "pos_emb_learnable": True, "pos_emb_interpolation": "crop",
        "min_fps": 1, "max_fps": 30, "use_adaln_lora": True, "adaln_lora_dim": 256,
        "num_blocks": 28, "num_heads": 16, "extra_per_block_abs_pos_emb": False,
        "rope_h_extrapolation_ratio": 4.0, "rope_w_extrapolation_ratio": 4.0,
        "rope_t_extrapolation_ratio": 1.0, "extra_h_extrapolation_ratio": 1.0,
        "extra_w_extrapolation_ratio": 1.0, "extra_t_extrapolation_ratio": 1.0,
        "rope_enable_fps_modulation": False,
    },
    min_comfyui="0.33.0",
    file_key_hint=r"[._](self_attn|cross_attn)[._]([qkv]_proj|output_proj)|llm_adapter|[._]mlp[._]layer[12](?!\d)",
    position=70,
)
