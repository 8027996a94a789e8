"""A diffusion model's Linear layers by name: what readers, checks and target rules work on.

An *inventory* is ``{module path: (out_features, in_features)}`` for the Linear layers of a ComfyUI
diffusion model, paths as ComfyUI names them inside it, without the ``diffusion_model.`` prefix
(LDM names for SDXL such as ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, BFL names for
FLUX such as ``double_blocks.0.img_attn.qkv``). A :class:`Target` is where an adapter trained on a
named layer writes: a module path and, for fused layers, the rows of its output that belong to
the named projection (FLUX ``img_attn.qkv`` rows ``[q | k | v]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

Inventory = Mapping[str, tuple[int, int]]


def inventory_from_module(diffusion_model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{path: (out_features, in_features)}`` of every ``nn.Linear`` in ``diffusion_model``.

    Works on models built on torch's ``meta`` device (shapes without memory).
    """
    return {name: (int(mod.out_features), int(mod.in_features))
            for name, mod in diffusion_model.named_modules() if isinstance(mod, torch.nn.Linear)}


@dataclass(frozen=True)
class Target:
    """Where an adapter writes: ``module``'s output rows ``out_rows`` (None: all rows).

    ``swap_halves``: the module's output is the named layer's with its two halves swapped
    (FLUX ``final_layer.adaLN_modulation.1`` is diffusers' ``norm_out.linear`` as [scale | shift]).
    """

    module: str
    out_rows: tuple[int, int] | None = None
    swap_halves: bool = False
