"""Which Linear layers of a diffusion model get a trainable adapter, and on which output rows.

The layers are the family's (``Family.layers`` in :mod:`tlora_core.families`): ``"attention"``
follows the reference code (the paper's setup), ``"attention+ff"`` adds the feed-forward Linears,
the default of LyCORIS / SimpleTuner T-LoRA training. Fused layers (FLUX ``qkv``, ``linear1``) get
one adapter per projection, on that projection's output rows.
"""

from __future__ import annotations

import torch

from ..tlora_core import families
from ..tlora_core.families import SCOPES, Family, TrainTarget
from ..tlora_core.inventory import inventory_from_module

__all__ = ["SCOPES", "TrainTarget", "find_targets"]


def find_targets(diffusion_model: torch.nn.Module, family: Family | str,
                 scope: str = "attention") -> list[TrainTarget]:
    """The adapters to train on ``diffusion_model`` (works on the ``meta`` device), in module order.

    ``family``: a :class:`Family` or its id. Raises ValueError for an unknown family or scope, or
    when nothing matches.
    """
    if isinstance(family, str):
        family = families.get(family)
    return family.targets(inventory_from_module(diffusion_model), scope)
