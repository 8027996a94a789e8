"""Which Linear layers of a diffusion model get a trainable adapter, and on which output rows.

``"attention"`` follows the reference code (ControlGenAI/T-LoRA), i.e. the paper's setup:

- SDXL: ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every ``attn1`` and ``attn2`` (560 Linears on
  the full-size UNet).
- FLUX: per double block ``img_attn.qkv`` and ``txt_attn.qkv`` as three separate q/k/v adapters on
  the fused layer's output rows (the reference's ``to_q/to_k/to_v`` and ``add_q/k/v_proj``) and
  ``img_attn.proj`` (``to_out``); per single block the q/k/v rows of ``linear1``. The reference never
  trains ``txt_attn.proj`` (``to_add_out``) nor a single block's output, so neither do we.

``"attention+ff"`` adds the feed-forward Linears (SDXL ``ff.net.0.proj`` / ``ff.net.2``; FLUX
``img_mlp``/``txt_mlp``, the MLP rows of ``linear1`` and the whole of ``linear2``), the default of
LyCORIS / SimpleTuner T-LoRA training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

SCOPES = ("attention", "attention+ff")

_SDXL_ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_SDXL_FF = re.compile(r"\.ff\.net\.(0\.proj|2)$")


@dataclass(frozen=True)
class TrainTarget:
    """One adapter: on ``module`` (a Linear), writing ``out_rows`` of its output (None = all)."""

    module: str
    out_rows: tuple[int, int] | None
    out_features: int
    in_features: int

    @property
    def rows(self) -> int:
        return self.out_features if self.out_rows is None else self.out_rows[1] - self.out_rows[0]


def _linears(diffusion_model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)}


def _whole(name: str, m: torch.nn.Linear) -> TrainTarget:
    return TrainTarget(name, None, m.out_features, m.in_features)


def _rows(name: str, m: torch.nn.Linear, start: int, stop: int) -> TrainTarget:
    return TrainTarget(name, (start, stop), m.out_features, m.in_features)


def _sdxl_targets(linears: dict[str, torch.nn.Linear], scope: str) -> list[TrainTarget]:
    out = []
    for name, m in linears.items():
        if _SDXL_ATTENTION.search(name) or (scope == "attention+ff" and _SDXL_FF.search(name)):
            out.append(_whole(name, m))
    return out


def _flux_targets(linears: dict[str, torch.nn.Linear], scope: str) -> list[TrainTarget]:
    out = []
    ff = scope == "attention+ff"
    for name, m in linears.items():
        parts = name.split(".")
        if parts[0] == "double_blocks" and len(parts) == 4 and parts[2] in ("img_attn", "txt_attn"):
            if parts[3] == "qkv":
                h = m.out_features // 3
                out.extend(_rows(name, m, i * h, (i + 1) * h) for i in range(3))
            elif parts[3] == "proj" and parts[2] == "img_attn":
                out.append(_whole(name, m))
        elif ff and parts[0] == "double_blocks" and len(parts) == 4 and parts[2] in ("img_mlp", "txt_mlp"):
            out.append(_whole(name, m))
        elif parts[0] == "single_blocks" and len(parts) == 3 and parts[2] == "linear1":
            h = m.in_features
            out.extend(_rows(name, m, i * h, (i + 1) * h) for i in range(3))
            if ff:
                out.append(_rows(name, m, 3 * h, m.out_features))
        elif ff and parts[0] == "single_blocks" and len(parts) == 3 and parts[2] == "linear2":
            out.append(_whole(name, m))
    return out


def find_targets(diffusion_model: torch.nn.Module, architecture: str,
                 scope: str = "attention") -> list[TrainTarget]:
    """The adapters to train on ``diffusion_model`` (works on the ``meta`` device), in module order.

    Raises ValueError for an unknown architecture or scope, or when nothing matches.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown target scope {scope!r} (known: {', '.join(SCOPES)})")
    linears = _linears(diffusion_model)
    if architecture == "sdxl":
        targets = _sdxl_targets(linears, scope)
    elif architecture == "flux":
        targets = _flux_targets(linears, scope)
    else:
        raise ValueError(f"training supports SDXL and FLUX models, not {architecture!r}")
    if not targets:
        raise ValueError(f"no {scope} layers found in this {architecture} model; is it really "
                         f"{architecture}? (first Linear layers: {list(linears)[:3]})")
    return targets
