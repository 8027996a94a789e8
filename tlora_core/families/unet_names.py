"""Module names of ComfyUI's LDM UNet (SDXL, SD 1.5): target rules, and diffusers spellings both ways.

Any UNet whose layout (residual blocks per level, which blocks carry a transformer) is read off
the inventory is mapped, so the real SDXL and the tests' tiny one alike. Inside a transformer the
names agree. Input blocks: ``0`` = conv_in, then per level ``num_res_blocks[x]`` blocks and one
downsample (except the last level). Output blocks: per level, last level first,
``num_res_blocks + 1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..inventory import Inventory, Target
from ._spec import Layers

ATTENTION_AND_FF = (
    Layers(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    Layers(r"\.ff\.net\.(0\.proj|2)$", scope="ff"),
)
"""The UNet families' target layers: to_q/k/v/out of every attn1 (self) and attn2 (cross)
attention, as the reference code; the feed-forwards in scope attention+ff (LyCORIS, SimpleTuner)."""
CHECKPOINT_BLOCKS = ("ResBlock", "BasicTransformerBlock")
"""The UNet blocks gradient checkpointing wraps."""

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_TO_DIFFUSERS = {v: k for k, v in _RESNET_TO_LDM.items()}
_SDXL_BASIC = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_SDXL_BASIC_REV = {v: k for k, v in _SDXL_BASIC.items()}
# Older diffusers UNets name SDXL's add_embedding class_embedding: accepted, never produced.
_SDXL_BASIC.update({"class_embedding.linear_1": "label_emb.0.0",
                    "class_embedding.linear_2": "label_emb.0.2"})


@dataclass(frozen=True)
class SdxlLayout:
    """The block layout of an LDM UNet: residual blocks per level, and which blocks hold attention
    (see the module docstring)."""

    num_res_blocks: tuple[int, ...]
    output_attention: frozenset[int] = frozenset()

    @classmethod
    def from_inventory(cls, inventory: Inventory) -> SdxlLayout:
        res_in = sorted({int(m.group(1)) for p in inventory
                         if (m := re.match(r"input_blocks\.(\d+)\.0\.emb_layers\.1$", p))})
        res_out = {int(m.group(1)) for p in inventory
                   if (m := re.match(r"output_blocks\.(\d+)\.0\.emb_layers\.1$", p))}
        if not res_in:
            raise ValueError("no residual blocks (input_blocks.N.0.emb_layers.1) in the model")
        levels = [[res_in[0]]]
        for n in res_in[1:]:
            # A gap in the indices is a downsample block: the next level starts.
            if n == levels[-1][-1] + 1:
                levels[-1].append(n)
            else:
                levels.append([n])
        layout = cls(tuple(len(level) for level in levels), frozenset(
            int(m.group(1)) for p in inventory if (m := re.match(r"output_blocks\.(\d+)\.1\.", p))))
        if res_out != set(range(sum(n + 1 for n in layout.num_res_blocks))):
            raise ValueError(f"output blocks {sorted(res_out)} do not fit the residual layout "
                             f"{layout.num_res_blocks} read from the input blocks")
        return layout

    def input_index(self, level: int, i: int) -> int:
        return 1 + sum(n + 1 for n in self.num_res_blocks[:level]) + i

    def output_index(self, level: int, i: int) -> int:
        rev = self.num_res_blocks[::-1]
        return sum(n + 1 for n in rev[:level]) + i


def sdxl_diffusers_to_ldm(name: str, layout: SdxlLayout) -> str | None:
    """LDM module path of a diffusers UNet module name, or None if it has none."""
    if name in _SDXL_BASIC:
        return _SDXL_BASIC[name]
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                 r"\.(\d+)(?:\.(.+))?$", name) or re.match(
                     r"(mid_block)()\.(resnets|attentions)\.(\d+)(?:\.(.+))?$", name)
    if m is None:
        return None
    where, level, kind, i, rest = m.group(1), m.group(2), m.group(3), int(m.group(4)), m.group(5)
    levels = len(layout.num_res_blocks)
    if kind == "resnets":
        if rest not in _RESNET_TO_LDM:
            return None
        rest = _RESNET_TO_LDM[rest]
    if where == "mid_block":
        block = {("resnets", 0): "middle_block.0", ("attentions", 0): "middle_block.1",
                 ("resnets", 1): "middle_block.2"}.get((kind, i))
        return None if block is None else f"{block}.{rest}" if rest else block
    level = int(level)
    if level >= levels:
        return None
    if where == "down_blocks":
        count = layout.num_res_blocks[level]
        if kind == "downsamplers":
            if i != 0 or level == levels - 1 or rest != "conv":
                return None
            return f"input_blocks.{layout.input_index(level, count)}.0.op"
        if kind == "upsamplers" or i >= count:
            return None
        block = f"input_blocks.{layout.input_index(level, i)}.{0 if kind == 'resnets' else 1}"
    else:
        count = layout.num_res_blocks[::-1][level] + 1
        if kind == "upsamplers":
            if i != 0 or level == levels - 1 or rest != "conv":
                return None
            n = layout.output_index(level, count - 1)
            return f"output_blocks.{n}.{2 if n in layout.output_attention else 1}.conv"
        if kind == "downsamplers" or i >= count:
            return None
        block = f"output_blocks.{layout.output_index(level, i)}.{0 if kind == 'resnets' else 1}"
    return f"{block}.{rest}" if rest else block


def _locate_block(n: int, num_res_blocks: tuple[int, ...]) -> tuple[int, int] | None:
    """(level, index in level) of the n-th block when each level holds ``num_res_blocks + 1``."""
    for level, count in enumerate(num_res_blocks):
        if n <= count:
            return (level, n) if n >= 0 else None
        n -= count + 1
    return None


def sdxl_ldm_to_diffusers(path: str, layout: SdxlLayout) -> str | None:
    """The diffusers UNet name of an LDM module path, or None if it has none (inverse mapping)."""
    if path in _SDXL_BASIC_REV:
        return _SDXL_BASIC_REV[path]
    m = re.match(r"middle_block\.([012])\.(.+)$", path)
    if m is not None:
        n, rest = int(m.group(1)), m.group(2)
        if n == 1:
            return f"mid_block.attentions.0.{rest}"
        res = _RESNET_TO_DIFFUSERS.get(rest)
        return f"mid_block.resnets.{n // 2}.{res}" if res else None
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$", path)
    if m is None:
        return None
    where, n, sub, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    nrb = layout.num_res_blocks if where == "input_blocks" else layout.num_res_blocks[::-1]
    located = _locate_block(n - (1 if where == "input_blocks" else 0), nrb)
    if located is None:
        return None
    level, i = located
    count = nrb[level]
    prefix = "down_blocks" if where == "input_blocks" else "up_blocks"
    if where == "input_blocks" and i == count:
        return f"down_blocks.{level}.downsamplers.0.conv" if f"{sub}.{rest}" == "0.op" else None
    if sub == "0":
        res = _RESNET_TO_DIFFUSERS.get(rest)
        return f"{prefix}.{level}.resnets.{i}.{res}" if res else None
    if sub == "1" and rest != "conv":
        return f"{prefix}.{level}.attentions.{i}.{rest}"
    if rest == "conv" and where == "output_blocks" and i == count:
        return f"up_blocks.{level}.upsamplers.0.conv"
    return None


def diffusers_names(inventory: Inventory) -> dict[str, Target]:
    """Every diffusers name of the inventory's modules -> its target (for the name index)."""
    layout = SdxlLayout.from_inventory(inventory)
    names = {}
    for path in inventory:
        name = sdxl_ldm_to_diffusers(path, layout)
        if name is not None:
            names[name] = Target(path)
    names.update({name: Target(path) for name, path in _SDXL_BASIC.items() if path in inventory})
    return names
