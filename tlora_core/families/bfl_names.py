"""Module names of ComfyUI's BFL FLUX transformer and their diffusers spellings.

Diffusers names map to a BFL module and, on fused layers, its output rows (``img_attn.qkv`` rows
``[q | k | v]``, ``linear1`` rows ``[q | k | v | mlp]``); hidden and MLP widths are read off the
inventory. Included are the aliases newer ComfyUI (0.33+) maps too: ``ff.linear_in/out`` and
``ff_context.linear_in/out`` (= ``img_mlp`` / ``txt_mlp``), and the single blocks'
``attn.to_qkv_mlp_proj`` (all rows of ``linear1``) and ``attn.to_out`` (``linear2``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..inventory import Inventory, Target
from ._spec import Layers, after_qkv, leading_qkv, thirds

ATTENTION_AND_FF = (
    Layers(r"^double_blocks\.\d+\.(img|txt)_attn\.qkv$", rows=thirds),
    Layers(r"^double_blocks\.\d+\.img_attn\.proj$"),
    Layers(r"^double_blocks\.\d+\.(img|txt)_mlp\.\d+$", scope="ff"),
    Layers(r"^single_blocks\.\d+\.linear1$", rows=leading_qkv),
    Layers(r"^single_blocks\.\d+\.linear1$", scope="ff", rows=after_qkv),
    Layers(r"^single_blocks\.\d+\.linear2$", scope="ff"),
)
"""The BFL transformer families' target layers (FLUX.1, FLUX.2, Chroma share the block classes),
the reference code's for FLUX: per double block the q/k/v rows of img and txt ``qkv`` (three
adapters on each fused layer) and ``img_attn.proj`` (to_out); per single block the q/k/v rows of
``linear1`` (its MLP rows are read off the layer, 4h on FLUX.1, 6h SwiGLU on FLUX.2). The
reference never trains ``txt_attn.proj`` nor a single block's output. attention+ff adds the MLPs,
the MLP rows of ``linear1`` and all of ``linear2``. Modulations and embedders are never targets."""
CHECKPOINT_BLOCKS = ("DoubleStreamBlock", "SingleStreamBlock")
"""The BFL blocks gradient checkpointing wraps (they update tensors in place: backward needs it)."""


@dataclass(frozen=True)
class FluxDims:
    """Widths of a FLUX transformer: hidden size and the MLP rows of ``single_blocks.N.linear1``."""

    hidden: int
    mlp: int
    depth: int
    depth_single: int

    @classmethod
    def from_inventory(cls, inventory: Inventory) -> FluxDims:
        try:
            hidden = inventory["double_blocks.0.img_attn.proj"][0]
            linear1 = inventory["single_blocks.0.linear1"][0]
        except KeyError as err:
            raise ValueError(f"not a FLUX transformer: no module {err}") from None
        depth = len({p.split(".")[1] for p in inventory if p.startswith("double_blocks.")})
        single = len({p.split(".")[1] for p in inventory if p.startswith("single_blocks.")})
        return cls(hidden, linear1 - 3 * hidden, depth, single)


_FLUX_DOUBLE = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1),
                "attn.to_v": ("img_attn.qkv", 2), "attn.add_q_proj": ("txt_attn.qkv", 0),
                "attn.add_k_proj": ("txt_attn.qkv", 1), "attn.add_v_proj": ("txt_attn.qkv", 2),
                "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
                "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
                "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
                "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
                # Newer diffusers / LyCORIS spellings of the feed-forwards (ComfyUI maps them from 0.33)
                "ff.linear_in": ("img_mlp.0", None), "ff.linear_out": ("img_mlp.2", None),
                "ff_context.linear_in": ("txt_mlp.0", None), "ff_context.linear_out": ("txt_mlp.2", None)}
_FLUX_SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
                "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None),
                "norm.linear": ("modulation.lin", None),
                # FLUX.2's diffusers names of the fused single-block layers: all of linear1
                # (q | k | v | mlp) and all of linear2 (ComfyUI maps them from 0.33)
                "attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)}
_FLUX_BASIC = {"x_embedder": "img_in", "context_embedder": "txt_in",
               "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
               "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
               "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
               "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
               "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
               "proj_out": "final_layer.linear"}


def flux_diffusers_to_bfl(name: str, dims: FluxDims) -> Target | None:
    """BFL module and output rows of a diffusers FLUX module name, or None if it has none."""
    if name in _FLUX_BASIC:
        return Target(_FLUX_BASIC[name])
    if name == "norm_out.linear":
        return Target("final_layer.adaLN_modulation.1", swap_halves=True)
    m = re.match(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)$", name)
    if m is None:
        return None
    single = m.group(1) == "single_transformer_blocks"
    entry = (_FLUX_SINGLE if single else _FLUX_DOUBLE).get(m.group(3))
    if entry is None:
        return None
    module, part = entry
    path = f"{'single_blocks' if single else 'double_blocks'}.{m.group(2)}.{module}"
    if part is None:
        return Target(path)
    h = dims.hidden
    return Target(path, (3 * h, 3 * h + dims.mlp) if part == 3 else (part * h, (part + 1) * h))


def flux_diffusers_names(dims: FluxDims) -> Iterable[str]:
    """Every diffusers FLUX module name that :func:`flux_diffusers_to_bfl` maps."""
    yield from _FLUX_BASIC
    yield "norm_out.linear"
    for i in range(dims.depth):
        yield from (f"transformer_blocks.{i}.{k}" for k in _FLUX_DOUBLE)
    for i in range(dims.depth_single):
        yield from (f"single_transformer_blocks.{i}.{k}" for k in _FLUX_SINGLE)


def diffusers_names(inventory: Inventory) -> dict[str, Target]:
    """Every diffusers name (and ComfyUI's ``linear1_qkv``) of the inventory's modules -> target."""
    dims = FluxDims.from_inventory(inventory)
    names = {}
    for name in flux_diffusers_names(dims):
        target = flux_diffusers_to_bfl(name, dims)
        if target.module in inventory:
            names[name] = target
    for i in range(dims.depth_single):   # ComfyUI's spelling of linear1's q|k|v rows
        names[f"single_blocks.{i}.linear1_qkv"] = Target(f"single_blocks.{i}.linear1",
                                                         (0, 3 * dims.hidden))
    return names
