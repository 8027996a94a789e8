"""The tiny test config of each model family: what the harness needs to build and feed one.

Adding a family to the pack means adding its file under ``tlora_core/families/`` and one
:class:`TinyFamily` entry here; the harness (``comfy_runtime``) and the family-parametrised tests
read everything else from the registry (the real-size config included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import comfy_compat


def _sdxl_fix(model_config) -> None:
    # The SDXL class forces 64-channel heads; tiny widths need smaller ones.
    if model_config.unet_config.get("num_head_channels") in (None, 64) and \
            model_config.unet_config.get("model_channels", 320) < 64:
        model_config.unet_config["num_head_channels"] = 16


@dataclass(frozen=True)
class TinyFamily:
    """How tests build and condition a tiny model of one family."""

    supported_model: str                       # the comfy.supported_models class
    config: dict[str, Any]                     # the tiny unet config
    fixed_tokens: int | None                   # text tokens of fake conditioning (None: any)
    cond_extra: dict[str, Any]                 # conditioning options besides pooled_output
    y_width: int | None = None                 # the raw model's ``y`` input (pooled / adm), if any
    guidance: float | None = None              # the raw model's ``guidance`` input, if any
    tokens_input: str | None = None            # the raw model's input of the text token count, if any
    complete: Callable[[dict], dict] = dict    # config -> what this runtime's classes require
    fix: Callable[[Any], None] = lambda model_config: None   # adjust the built model config
    # Adapters of the family file's real config per target scope, counted from the model code.
    real_targets: dict[str, int] = field(default_factory=dict)
    # Fill what seeded parameters leave out (buffers a checkpoint would load): (model, seed).
    after_build: Callable[[Any, int], None] = lambda model, seed: None
    # The ComfyUI versions its tests run on (the README's family table says so).
    runtimes: tuple[str, ...] = ("0.3.75", "0.33.0")
    # The family file's other real configs: name -> (the ComfyUI versions that load it, adapters
    # per target scope). Their real-size tests are deselected on the other versions.
    other_real: dict[str, tuple[tuple[str, ...], dict[str, int]]] = field(default_factory=dict)
    # The registry family this tiny model is a variant of (None: the TINY key is the family's id),
    # e.g. FLUX.2 Klein, a FLUX.2 without a guidance input. A variant has no real_targets of its own.
    variant_of: str | None = None
    context_width: int = 32                    # width of the fake text conditioning
    # The raw model's further inputs for a batch, drawn from a generator (Anima's T5 token ids
    # and weights, which its conditioning carries as cond_extra): (batch, gen) -> kwargs.
    extra_inputs: Callable[[int, Any], dict] = lambda batch, gen: {}


TINY: dict[str, TinyFamily] = {
    "sdxl": TinyFamily(
        supported_model="SDXL", fixed_tokens=77, fix=_sdxl_fix, y_width=32 + 6 * 256,
        # 70 transformer blocks: q/k/v/out of attn1 and attn2 (the reference code's 560), + 2 ff
        real_targets={"attention": 560, "attention+ff": 700},
        config={
            "model_channels": 32, "in_channels": 4, "out_channels": 4,
            "num_res_blocks": [1, 1], "channel_mult": [1, 2],
            "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
            "transformer_depth_middle": 1, "context_dim": 32, "adm_in_channels": 32 + 6 * 256,
            "use_linear_in_transformer": True, "num_classes": "sequential", "legacy": False,
            "use_spatial_transformer": True, "image_size": 32, "use_checkpoint": False,
            "use_temporal_attention": False, "use_temporal_resblock": False,
        },
        cond_extra={"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024,
                    "target_height": 1024}),
    "flux": TinyFamily(
        supported_model="Flux", fixed_tokens=None, complete=lambda c: comfy_compat.flux_config(c),
        y_width=32, guidance=3.5,
        # 19 double blocks x (img q, k, v, proj + txt q, k, v), 38 single blocks x linear1's q, k, v;
        # ff adds img / txt MLPs (4) per double block, linear1's MLP rows and linear2 per single block
        real_targets={"attention": 19 * 7 + 38 * 3, "attention+ff": 19 * 11 + 38 * 5},
        config={
            "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
            "patch_size": 2, "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64,
            "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
            "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
        },
        cond_extra={"guidance": 3.5}),
    "sd15": TinyFamily(
        supported_model="SD15", fixed_tokens=77,
        # 16 transformer blocks x q/k/v/out of attn1 and attn2, + 2 ff each
        real_targets={"attention": 128, "attention+ff": 160},
        config={
            "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32,
            "num_res_blocks": [1, 1], "transformer_depth": [1, 0], "channel_mult": [1, 2],
            "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 32,
            "num_heads": 2, "transformer_depth_output": [0, 0, 1, 1],
            "use_temporal_attention": False, "use_temporal_resblock": False,
        },
        cond_extra={}),
    "chroma": TinyFamily(
        supported_model="Chroma", fixed_tokens=None, complete=lambda c: comfy_compat.chroma_config(c),
        guidance=0.0,   # the raw model's distilled guidance input; ComfyUI's default for Chroma
        real_targets={"attention": 19 * 7 + 38 * 3, "attention+ff": 19 * 11 + 38 * 5},   # FLUX.1's
        config={
            "image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2,
            "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
            "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True,
            "in_dim": 64, "out_dim": 64, "hidden_dim": 32, "n_layers": 1,
        },
        cond_extra={}),
}


def _seed_pos_embed(model, seed: int) -> None:
    # SD3's pos_embed is a buffer made with torch.empty (checkpoints fill it).
    import torch

    with torch.no_grad():
        buffer = model.diffusion_model.pos_embed
        buffer.copy_(0.05 * torch.randn(buffer.shape, generator=torch.Generator().manual_seed(seed + 7)))


TINY["sd3"] = TinyFamily(
    # Depth 2 (hidden 128, 2 heads), block 0 with SD3.5-medium's second image attention, RMS qk-norm.
    supported_model="SD3", fixed_tokens=None, y_width=32, after_build=_seed_pos_embed,
    # SD3.5-large: 38 blocks x (x qkv 3 + x proj + context qkv 3 + context proj), the last block's
    # context (pre_only) has no proj and only k / v adapters; ff adds x and context fc1 / fc2,
    # none on the last context.
    real_targets={"attention": 38 * 8 - 2, "attention+ff": 38 * 12 - 4},
    config={
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
        "adm_in_channels": 32,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": 32, "out_features": 128}},
        "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [0], "qk_norm": "rms",
    },
    cond_extra={})


def _scale_flux2_modulations(model, seed: int) -> None:
    # FLUX.2's shared modulations have no bias: seeded at 0.05 std, their shifts / scales / gates
    # average ~0.018 (measured) and the blocks barely reach the output (3x larger block outputs move
    # it by 1% of its scale, 9% on the tiny FLUX.1). Ten times the seed (outputs ~0.18) lets the
    # blocks act on the tiny model as FLUX.1's biased modulations do.
    import torch

    with torch.no_grad():
        for name, param in model.diffusion_model.named_parameters():
            if "stream_modulation" in name:
                param.mul_(10.0)


TINY["flux2"] = TinyFamily(
    # FLUX.2's configuration of the BFL transformer at hidden 64 (2 heads of 32 = 4 rope axes of 8),
    # one double and one single block; the rest as ComfyUI's detection sets it for FLUX.2.
    supported_model="Flux2", fixed_tokens=None, complete=lambda c: comfy_compat.flux2_config(c),
    after_build=_scale_flux2_modulations,
    guidance=3.5,   # the raw model's guidance input (dev has a guidance embedder)
    # FLUX.2 dev: 8 double blocks x (img q, k, v, proj + txt q, k, v), 48 single blocks x linear1's
    # q, k, v; ff adds img / txt MLPs (4) per double block, linear1's MLP rows and linear2 per single
    real_targets={"attention": 8 * 7 + 48 * 3, "attention+ff": 8 * 11 + 48 * 5},
    # Klein 4B (5 double, 20 single blocks) and 9B (8, 24), counted the same way. ComfyUI 0.3.75
    # detects them with 48 heads (4B: "expected positional dim 64", 9B: "4096 must be divisible
    # by num_heads 48"): only 0.33 loads them.
    other_real={
        "klein-4b": (("0.33.0",), {"attention": 5 * 7 + 20 * 3, "attention+ff": 5 * 11 + 20 * 5}),
        "klein-9b": (("0.33.0",), {"attention": 8 * 7 + 24 * 3, "attention+ff": 8 * 11 + 24 * 5}),
    },
    config={
        "image_model": "flux2", "axes_dim": [8, 8, 8, 8], "num_heads": 2, "mlp_ratio": 3.0,
        "theta": 2000, "out_channels": 128, "global_modulation": True, "mlp_silu_act": True,
        "qkv_bias": False, "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0,
        "patch_size": 1, "in_channels": 128, "vec_in_dim": None, "hidden_size": 64,
        "context_in_dim": 32, "depth": 1, "depth_single_blocks": 1, "guidance_embed": True,
    },
    cond_extra={"guidance": 3.5})


TINY["flux2_klein"] = TinyFamily(
    # FLUX.2 Klein: the tiny FLUX.2 above without the guidance embedder (Klein's real configs have
    # none), so the family's code paths run on a model that takes no guidance input.
    supported_model="Flux2", fixed_tokens=None, complete=lambda c: comfy_compat.flux2_config(c),
    after_build=_scale_flux2_modulations, variant_of="flux2",
    config={**TINY["flux2"].config, "guidance_embed": False},
    cond_extra={})


TINY["zimage"] = TinyFamily(
    # dim 256, the least Z-Image's modulation takes (its adaLN reads min(dim, 256) features of a
    # 256-wide timestep embedding); 2 heads of 128 (= sum of axes_dims), one block per stack.
    supported_model="ZImage", fixed_tokens=None, tokens_input="num_tokens",
    # Z-Image Turbo: 30 layers + 2 noise + 2 context refiners, each qkv (3) + out; ff adds w1-w3.
    real_targets={"attention": 34 * 4, "attention+ff": 34 * 7},
    config={
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 32,
        "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2,
        "axes_dims": [32, 48, 48], "axes_lens": [64, 64, 64], "rope_theta": 256.0,
        "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
        "pad_tokens_multiple": 32,
    },
    cond_extra={})


TINY["qwen_image"] = TinyFamily(
    # Two joint blocks of 2 heads x 32 (= sum of axes_dims_rope), text width 32; the rest as the
    # real model (patch 2, 64 packed input channels, 16 latent channels).
    supported_model="QwenImage", fixed_tokens=None,
    # Qwen-Image: 60 blocks x 8 attention projections, the last block's text query and text output
    # not (dead: the text stream's output is discarded); ff adds img / txt MLPs (4), not the last
    # block's txt MLP (2).
    real_targets={"attention": 60 * 8 - 2, "attention+ff": 60 * 12 - 4},
    config={
        "image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2,
        "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32,
        "axes_dims_rope": [8, 12, 12],
    },
    cond_extra={})


TINY["krea2"] = TinyFamily(
    # Width 64, 2 query heads of 32 (rope axes 8 + 12 + 12) and 1 key / value head, 2 blocks; the
    # text fusion over 3 stacked layers of 32 (the released model: 12 of 2560).
    supported_model="Krea2", fixed_tokens=None, context_width=3 * 32, runtimes=("0.33.0",),
    # Krea 2: 28 blocks x wq, wk, wv, wo; ff adds the SwiGLU's gate, up, down.
    real_targets={"attention": 28 * 4, "attention+ff": 28 * 7},
    config={
        "image_model": "krea2", "features": 64, "heads": 2, "kvheads": 1, "multiplier": 4,
        "layers": 2, "patch": 2, "channels": 16, "txtdim": 32, "txtlayers": 3, "txtheads": 2,
        "txtkvheads": 2,
    },
    cond_extra={})


ANIMA_T5_TOKENS = 5


def _t5_inputs(batch: int, gen) -> dict:
    # What Anima's model class makes of _anima_cond_extra for a batch: (B, N) ids, (B, N, 1) weights.
    import torch

    return {"t5xxl_ids": torch.randint(0, 32128, (batch, ANIMA_T5_TOKENS), generator=gen),
            "t5xxl_weights": torch.ones(batch, ANIMA_T5_TOKENS, 1)}


def _anima_cond_extra() -> dict:
    # Per prompt as Anima's text encoder gives them: 1-D T5 token ids (ComfyUI's model class adds
    # the batch axis) and their weights.
    import torch

    return {"t5xxl_ids": torch.arange(3, 3 + ANIMA_T5_TOKENS), "t5xxl_weights": torch.ones(ANIMA_T5_TOKENS)}


TINY["anima"] = TinyFamily(
    # Cosmos-Predict2 at width 64 (2 heads), 2 blocks, as ComfyUI's detection fills the rest. The
    # text adapter has fixed widths (ComfyUI builds it at full size, 0.14 B parameters), so the
    # conditioning stays 1024 wide.
    supported_model="Anima", fixed_tokens=None, context_width=1024, runtimes=("0.33.0",),
    extra_inputs=_t5_inputs,
    # Anima: 28 blocks x (self and cross attention: q, k, v, output); ff adds mlp.layer1 / layer2.
    real_targets={"attention": 28 * 8, "attention+ff": 28 * 10},
    config={
        "image_model": "anima", "max_img_h": 32, "max_img_w": 32, "max_frames": 4, "in_channels": 16,
        "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 64,
        "concat_padding_mask": True, "crossattn_emb_channels": 1024, "pos_emb_cls": "rope3d",
        "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30,
        "use_adaln_lora": True, "adaln_lora_dim": 16, "num_blocks": 2, "num_heads": 2,
        "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0,
        "rope_w_extrapolation_ratio": 4.0, "rope_t_extrapolation_ratio": 1.0,
        "extra_h_extrapolation_ratio": 1.0, "extra_w_extrapolation_ratio": 1.0,
        "extra_t_extrapolation_ratio": 1.0, "rope_enable_fps_modulation": False,
    },
    cond_extra=_anima_cond_extra())


def registry_id(tiny_id: str) -> str:
    """The pack's family id of the tiny model ``tiny_id`` (a TINY key: a family or a variant of one)."""
    return TINY[tiny_id].variant_of or tiny_id


def runs_here(family: str, version: str) -> bool:
    """Whether ``family``'s tests run on ComfyUI ``version`` (its tiny config's ``runtimes``);
    the others are deselected at collection, as their model classes are absent there."""
    return version in TINY[family].runtimes


def real_sizes() -> list[tuple[str, str | None]]:
    """``(family, other real config or None = the family file's real_config)`` for every family."""
    out: list[tuple[str, str | None]] = []
    for family, tiny in TINY.items():
        if tiny.variant_of:
            continue
        out.append((family, None))
        out.extend((family, name) for name in tiny.other_real)
    return out


def real_size_runtimes(family: str, name: str | None) -> tuple[str, ...]:
    tiny = TINY[family]
    return tiny.runtimes if name is None else tiny.other_real[name][0]


def real_size_targets(family: str, name: str | None) -> dict[str, int]:
    tiny = TINY[family]
    return tiny.real_targets if name is None else tiny.other_real[name][1]


def raw_inputs(family: str, batch: int, gen, tokens: int = 8):
    """``(context, extra kwargs)`` of a tiny model's raw forward: the family's ``extra_inputs``
    (Anima's T5 ids and weights), ``y`` and ``guidance`` where the family has them (drawn from
    ``gen`` after the context), then the text token count where the model takes it (Z-Image's
    ``num_tokens``)."""
    import torch

    tiny = TINY[family]
    ctx = torch.randn(batch, tiny.fixed_tokens or tokens, tiny.context_width, generator=gen)
    extra = tiny.extra_inputs(batch, gen)
    if tiny.y_width is not None:
        extra["y"] = torch.randn(batch, tiny.y_width, generator=gen)
    if tiny.guidance is not None:
        extra["guidance"] = torch.full((batch,), tiny.guidance)
    if tiny.tokens_input is not None:
        extra[tiny.tokens_input] = ctx.shape[1]
    return ctx, extra
