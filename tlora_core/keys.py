"""Module names: diffusers / kohya / LyCORIS names mapped onto ComfyUI's diffusion-model modules.

Contract. An *inventory* (:mod:`tlora_core.validate`) is ``{module path: (out, in)}`` for the
Linear layers of a ComfyUI diffusion model, paths without the ``diffusion_model.`` prefix (LDM
names for SDXL such as ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, BFL names for FLUX
such as ``double_blocks.0.img_attn.qkv``). A :class:`Target` is where an adapter trained on a
named layer writes: a module path, and for fused FLUX layers the rows of its output that belong
to the named projection (``img_attn.qkv`` rows ``[q | k | v]``, ``linear1``
rows ``[q | k | v | mlp]``).

- SDXL: diffusers UNet names (``down_blocks.1.attentions.0...``) <-> LDM names, for any UNet whose
  layout (residual blocks per level, which blocks carry a transformer) is read off the inventory,
  so it serves the real SDXL and the tests' tiny one alike. Inside a transformer the names agree.
- FLUX: diffusers names -> (BFL module, rows), hidden and MLP widths read off the inventory,
  including the aliases newer ComfyUI (0.33+) maps too: ``ff.linear_in/out`` and
  ``ff_context.linear_in/out`` (= ``img_mlp`` / ``txt_mlp``), and the single blocks'
  ``attn.to_qkv_mlp_proj`` (all rows of ``linear1``) and ``attn.to_out`` (``linear2``).
- kohya (``lora_unet_<path with _>``) and LyCORIS (``lycoris_<path with _>``) names are resolved
  by flattening every known name of the inventory the same way, since ``_`` cannot be split back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .validate import Inventory, detect_architecture

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
class Target:
    """Where an adapter writes: ``module``'s output rows ``out_rows`` (None: all rows).

    ``swap_halves``: the module's output is the named layer's with its two halves swapped
    (FLUX ``final_layer.adaLN_modulation.1`` is diffusers' ``norm_out.linear`` as [scale | shift]).
    """

    module: str
    out_rows: tuple[int, int] | None = None
    swap_halves: bool = False


@dataclass(frozen=True)
class SdxlLayout:
    """The block layout of an LDM UNet: residual blocks per level, and which blocks hold attention.

    Input blocks: ``0`` = conv_in, then per level ``num_res_blocks[x]`` blocks and one downsample
    (except the last level). Output blocks: per level, last level first, ``num_res_blocks + 1``.
    """

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


def flatten(name: str) -> str:
    """kohya / LyCORIS spelling of a module name: dots become underscores."""
    return name.replace(".", "_")


class ModuleIndex:
    """Resolves any known spelling of a layer name to a :class:`Target` of one model.

    Accepted spellings: the model's own paths (LDM / BFL), diffusers names, and both flattened
    with underscores. Prefixes such as ``lora_unet_`` are the caller's to strip.
    """

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = dict(inventory)
        self.architecture = detect_architecture(self.inventory)
        if self.architecture not in ("sdxl", "flux"):
            raise ValueError("the model is neither an SDXL UNet nor a FLUX transformer "
                             f"(modules such as {sorted(self.inventory)[:3]})")
        self.dotted: dict[str, Target] = {p: Target(p) for p in self.inventory}
        if self.architecture == "sdxl":
            self.layout = SdxlLayout.from_inventory(self.inventory)
            for path in self.inventory:
                name = sdxl_ldm_to_diffusers(path, self.layout)
                if name is not None:
                    self.dotted[name] = Target(path)
            self.dotted.update({name: Target(path) for name, path in _SDXL_BASIC.items()
                                if path in self.inventory})
        else:
            self.dims = FluxDims.from_inventory(self.inventory)
            for name in flux_diffusers_names(self.dims):
                target = flux_diffusers_to_bfl(name, self.dims)
                if target.module in self.inventory:
                    self.dotted[name] = target
            for i in range(self.dims.depth_single):   # ComfyUI's spelling of linear1's q|k|v rows
                self.dotted[f"single_blocks.{i}.linear1_qkv"] = Target(
                    f"single_blocks.{i}.linear1", (0, 3 * self.dims.hidden))
        self.flat: dict[str, Target | None] = {}
        for name, target in self.dotted.items():
            key = flatten(name)
            # Two different layers flattening alike would be ambiguous: refuse both.
            self.flat[key] = target if self.flat.get(key, target) == target else None

    def resolve(self, name: str) -> Target | None:
        """Target of a dotted or underscore-flattened layer name, or None."""
        target = self.dotted.get(name)
        return target if target is not None else self.flat.get(name)

    def shape(self, target: Target) -> tuple[int, int]:
        """``(out, in)`` the adapter must match (``out`` = the slice's rows on a fused layer)."""
        out, in_features = self.inventory[target.module]
        if target.out_rows is None:
            return out, in_features
        return target.out_rows[1] - target.out_rows[0], in_features


# Plain LoRA key spellings: (suffix, part). Longest first where one ends another.
_LORA_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),     # diffusers attention processors
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),     # kohya, ComfyUI
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),         # peft / diffusers
    (".alpha", "alpha"), (".lora_mid.weight", "mid"), (".dora_scale", "dora"),
)
MODEL_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_", "model.diffusion_model.",
                  "diffusion_model.", "base_model.model.", "unet.", "transformer.")
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_model", "te1.", "te2.", "te.", "lora_clip",
                         "clip_", "t5")


def split_lora_key(key: str) -> tuple[str, str] | None:
    """``(layer name, part)`` of a plain LoRA key, part in down / up / alpha / mid / dora; or None.

    The layer name keeps its prefix (``lora_unet_``, ``unet.``, ...); see :func:`strip_prefix`.
    """
    for suffix, part in _LORA_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            name = key[:-len(suffix)]
            if suffix.startswith("_lora."):
                # diffusers' old processor spelling: `<attn>.processor.to_out` is `<attn>.to_out.0`
                name = re.sub(r"\.processor\.(to_q|to_k|to_v|to_out)$",
                              lambda m: f".{m.group(1)}" + (".0" if m.group(1) == "to_out" else ""),
                              name)
            return name, part
    return None


def strip_prefix(name: str) -> tuple[str, bool]:
    """``(name without its model prefix, is_text_encoder)``."""
    if name.startswith(TEXT_ENCODER_PREFIXES):
        return name, True
    for prefix in MODEL_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):], False
    return name, False
