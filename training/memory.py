"""The working set of a T-LoRA training run: the device memory it needs beside the resident weights.

:func:`working_set` estimates, from the real model's structure and without running it, what one
training step of :mod:`training.loop` holds on the device besides the base weights ComfyUI keeps
resident, i.e. what T-LoRA Train asks ComfyUI to leave free (``load_models_gpu(memory_required=)``):

- ``adapter_state``: the adapters' fp32 parameters, their gradients, the optimizer's buffers and
  the Ortho variants' frozen init (:func:`training.modules.adapter_memory`, exact);
- ``step_factors``: one step's Ortho factors and their gradients (exact; 0 for Vanilla / LoRA);
- ``activations``: what one forward keeps for backward. With block checkpointing, each
  checkpointed block's inputs (tokens x width of each of its streams) and, outside the blocks,
  each layer's estimate (below) and the weight copies those layers keep; without checkpointing,
  every block's estimate and weight copies as well;
- ``recompute``: with checkpointing, the largest block's recomputation in backward: its estimate,
  the weight copies backward keeps of its layers that compute on a per-forward cast (a streamed
  layer's private copy of its cast, a layer stored in another dtype than the compute dtype: fp8,
  quantized; a resident plain layer computes on a zero-copy alias of its weight,
  :mod:`training.layer_weights`: nothing new) and its backward's working gradients (twice its
  largest saved tensor);
- ``offload_buffers``: ComfyUI's casts of streamed layers in flight: one per offload stream
  (``comfy.model_management.NUM_STREAMS``; at least one, the cast of the running layer) of the
  largest streamed layers in their stored dtype, plus the conversion of one to the compute dtype
  when they are stored in another (an fp8 base);
- ``slack``: an allowance, not a computed part: :data:`SLACK_FLOOR` plus :data:`SLACK_FRACTION`
  of the transient parts (activations, recompute, offload buffers). It covers the estimate's
  error (against ``bench/train_memory.py``'s exact meta-device computation, every family at its
  recipe, 1024 x 1024: a block's kept tensors -22% to +18%, the largest recomputation -14% to
  +18%, the forward's kept tensors -5% to +29%; ``tests/test_memory_plan.py``), the caching
  allocator's fragmentation and the small tensors left out (latents, noise, conditioning, the
  loss). The parts are summed although their peaks fall at different moments of a step, so the
  total is an upper bound of the exact model's need (3-28% over it before the slack).

The block estimate, per layer (Linear-like or convolution) running on ``n`` tokens with ``s``-byte
compute dtype: ``n * (in + out) * s``, the layer's input and output once, standing for what the
norms, activations and attention around it keep (a frozen layer itself keeps only its weight);
plus, when adapters sit on it, one fp32 copy of its input ``n * in * 4`` and per adapter its
low-rank product ``n * w * 4`` (``w``: the
factor width, twice the rank for the Ortho variants). A layer's tokens come from ComfyUI's module
names: per-sample modulations run on one (and keep nothing: their input needs no gradient), text
streams and cross-attention keys / values on the conditioning's tokens, the image stream on the
latent's patches (plus the text tokens in single-stream blocks, :data:`JOINT_BLOCKS`), a UNet's
levels on its latent halved per level. Layers no gradient reaches keep nothing: blocks before the
first block with an adapter, and outside the blocks all but a UNet's layers between its blocks
(after the first adapter) and the output projection (embedders and text encoders run first,
wherever module order puts them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from ..tlora_core.families import Family, TrainTarget
from .layer_weights import PLAIN
from .modules import ORTHO_VARIANTS, adapter_memory

GIB = 2 ** 30
SLACK_FLOOR = 256 * 2 ** 20
SLACK_FRACTION = 0.2
ADAPTER_BYTES = 4   # fp32 (training.modules.ADAPTER_DTYPE)

PER_SAMPLE = re.compile(r"(^|\.)(\w*_)?(mod|modulation)(_\w+)?(\.|$)|(^|\.)emb_layers(\.|$)")
"""Modulation layers (``img_mod``, ``adaLN_modulation``, ``double_stream_modulation_img``, a UNet
ResBlock's ``emb_layers``): one token per sample, from the timestep / pooled vector (no gradient)."""
CONTEXT_INPUT = re.compile(r"(^|\.)(attn2\.to_[kv]|cross_attn\.[kv]_proj)$")
"""Cross-attention keys / values: the conditioning itself is their input (no gradient)."""
TEXT = re.compile(r"(^|\.)(txt_attn|txt_mlp|context_block|context_refiner|add_[qkv]_proj|to_add_out)(\.|$)")
"""The text stream of two-stream blocks (FLUX, SD3, Qwen-Image) and Z-Image's caption refiner."""
JOINT_BLOCKS: dict[str, str | None] = {
    "flux": r"^single_blocks\.", "flux2": r"^single_blocks\.", "chroma": r"^single_blocks\.",
    "zimage": r"^layers\.", "krea2": r"^blocks\.",
    "sdxl": None, "sd15": None, "sd3": None, "qwen_image": None, "anima": None,
}
"""Per family, the blocks whose image stream carries the text tokens too (None: none). A family
missing here is taken as joint everywhere: the safe side (more tokens)."""


@dataclass(frozen=True)
class WorkingSet:
    """Device bytes of a training run beside the resident base weights (module docstring)."""

    adapter_state: int
    step_factors: int
    activations: int
    recompute: int
    offload_buffers: int
    slack: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def describe(self) -> str:
        parts = ", ".join(f"{f.name.replace('_', ' ')} {getattr(self, f.name) / GIB:.2f}" for f in fields(self))
        return f"working set {self.total / GIB:.2f} GiB ({parts})"


@dataclass(frozen=True)
class _Layer:
    name: str
    module: torch.nn.Module
    in_features: int
    out_features: int
    tokens: int          # per sample; 0: a per-sample modulation
    stream: str          # "image", "text" or "context" (its input is the conditioning)
    block: str | None    # the checkpointed block it is in
    keeps: bool          # a gradient can flow into it: it keeps its weight copy and activations


def _shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a Linear-like layer or a convolution (channels), else None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return int(module.in_channels), int(module.out_channels)
    features = (getattr(module, "in_features", None), getattr(module, "out_features", None))
    if isinstance(module, torch.nn.Linear) or all(isinstance(f, int) for f in features):
        return int(features[0]), int(features[1])
    return None


UNET_PARTS = ("input_blocks.", "middle_block.", "output_blocks.")


def _unet_tokens(dm: torch.nn.Module, height: int, width: int) -> dict[str, int]:
    """Tokens per part of a ComfyUI UNet (``input_blocks.i``, ``middle_block``, ``output_blocks.i``
    and each Upsample): the latent halved at every Downsample, doubled at every Upsample (whose
    convolution already runs at the doubled size)."""
    level, out = 0, {}

    def at(lv: int) -> int:
        return math.ceil(height / 2 ** lv) * math.ceil(width / 2 ** lv)

    for i, block in enumerate(dm.input_blocks):
        out[f"input_blocks.{i}"] = at(level)
        if any(type(m).__name__ == "Downsample" for m in block.modules()):
            level += 1
    out["middle_block"] = at(level)
    for i, block in enumerate(dm.output_blocks):
        out[f"output_blocks.{i}"] = at(level)
        for name, m in block.named_modules():
            if type(m).__name__ == "Upsample":
                out[f"output_blocks.{i}.{name}"] = at(level - 1)
                level -= 1
    return out


def _layers(dm: torch.nn.Module, family: Family, latent_shape: tuple[int, ...], context_tokens: int,
            blocks: list[str], adapters: Mapping[str, list[TrainTarget]]) -> list[_Layer]:
    """Every Linear-like layer and convolution of ``dm`` in module order, with its tokens, block
    and whether a gradient can flow into it: in a block from the first block with an adapter on;
    outside blocks, a UNet's layers between its blocks after the first adapter (a UNet runs in
    module order) and the output projection (the layer that makes the latent's patches: after the
    last block); not the embedders and text encoders that run before the blocks, whatever their
    place in module order."""
    spatial = latent_shape[2:]
    unet = _unet_tokens(dm, *spatial[-2:]) if hasattr(dm, "input_blocks") and hasattr(dm, "output_blocks") else None
    patch = 1
    if unet is None:
        patch = next((getattr(dm, a) for a in ("patch_size", "patch", "patch_spatial")
                      if isinstance(getattr(dm, a, None), int)), 1)
        image = math.prod(spatial[:-2]) * math.ceil(spatial[-2] / patch) * math.ceil(spatial[-1] / patch)
    output_width = patch * patch * latent_shape[1]
    joint = JOINT_BLOCKS.get(family.id, r"")
    first_block = next((i for i, b in enumerate(blocks) if any(a.startswith(b + ".") for a in adapters)),
                       len(blocks))
    after_first_adapter = False
    layers = []
    for name, module in dm.named_modules():
        shape = _shape(module)
        if shape is None:
            continue
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        after_first_adapter = after_first_adapter or name in adapters
        if PER_SAMPLE.search(name):
            tokens, stream = 0, "image"
        elif CONTEXT_INPUT.search(name):
            tokens, stream = context_tokens, "context"
        elif TEXT.search(name):
            tokens, stream = context_tokens, "text"
        elif unet is not None:
            key = max((k for k in unet if name.startswith(k + ".")), key=len, default=None)
            tokens, stream = (unet[key] if key else unet["input_blocks.0"]), "image"
        else:
            tokens = image + (context_tokens if joint is not None and re.search(joint, name) else 0)
            stream = "image"
        if block is not None:
            keeps = blocks.index(block) >= first_block
        elif unet is not None and name.startswith(UNET_PARTS):
            keeps = after_first_adapter
        else:
            keeps = shape[1] == output_width
        keeps = keeps and tokens > 0 and stream != "context"
        layers.append(_Layer(name, module, shape[0], shape[1], tokens, stream, block, keeps))
    return layers


def _weight_elements(module: torch.nn.Module) -> int:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return sum(math.prod(t.shape) for t in (weight, bias) if isinstance(t, torch.Tensor))


@dataclass
class _Block:
    saved: int = 0          # estimate of what it keeps for backward (activations, no weights)
    weights: int = 0        # bytes of the weight copies backward keeps
    largest: int = 0        # its largest saved tensor
    inputs: int = 0         # bytes of its input streams (what a checkpoint keeps)


def _cast(module: torch.nn.Module, compute_dtype: torch.dtype) -> bool:
    """Whether a layer computes on a per-forward cast of its weight even when resident: stored in
    another dtype (fp8) or as a quantized tensor (ComfyUI's QuantizedTensor, GGUF)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and (type(weight) not in PLAIN or weight.dtype != compute_dtype)


def _estimate(layers: list[_Layer], blocks: list[str], adapters: Mapping[str, list[TrainTarget]],
              width: int, compute_dtype: torch.dtype, batch: int,
              streamed: Mapping[str, torch.nn.Module]) -> tuple[dict[str, _Block], _Block]:
    """Per checkpointed block and for everything outside blocks: the module docstring's estimate."""
    size = compute_dtype.itemsize
    per: dict[str, _Block] = {b: _Block() for b in blocks}
    outside = _Block()
    streams_seen: dict[str, set[str]] = {b: set() for b in blocks}
    for layer in layers:
        part = per[layer.block] if layer.block else outside
        n = batch * layer.tokens
        if layer.block and layer.tokens and layer.stream != "context" \
                and layer.stream not in streams_seen[layer.block]:
            streams_seen[layer.block].add(layer.stream)   # the first layer of a stream: its input
            part.inputs += n * layer.in_features * size
        if not layer.keeps:
            continue
        on_layer = adapters.get(layer.name, ())
        # One fp32 copy of the layer's input for all its adapters, and each adapter's product.
        own = (n * layer.in_features + len(on_layer) * n * width) * ADAPTER_BYTES if on_layer else 0
        part.saved += n * (layer.in_features + layer.out_features) * size + own
        if layer.name in streamed or _cast(layer.module, compute_dtype):
            part.weights += _weight_elements(layer.module) * size
        part.largest = max(part.largest, n * layer.out_features * size,
                           n * layer.in_features * ADAPTER_BYTES if layer.name in adapters else 0)
    return per, outside


def offload_buffers(streamed: Mapping[str, torch.nn.Module], compute_dtype: torch.dtype,
                    num_streams: int | None = None) -> int:
    """Bytes of ComfyUI's casts of streamed layers in flight (module docstring)."""
    if not streamed:
        return 0
    import comfy.model_management as mm

    streams = max(1, mm.NUM_STREAMS if num_streams is None else num_streams)
    stored = sorted((mm.module_size(m) for m in streamed.values()), reverse=True)
    casts = sum(stored[:streams])
    converted = max((_weight_elements(m) * compute_dtype.itemsize for m in streamed.values()
                     if getattr(m, "weight", None) is not None and m.weight.dtype != compute_dtype),
                    default=0)
    return casts + converted


def streamable(diffusion_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every layer ComfyUI could stream (comfy ops with a weight): pass it as ``streamed`` for the
    working set of a load that may stream, before ComfyUI has chosen which layers."""
    return {name: m for name, m in diffusion_model.named_modules()
            if hasattr(m, "comfy_cast_weights") and isinstance(getattr(m, "weight", None), torch.Tensor)}


def streaming(diffusion_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers ComfyUI's last load of the model left streaming (:func:`training.prepare.streams`):
    ``streamed`` for the working set of the run as loaded (its log line)."""
    from .layer_weights import streams

    return {name: m for name, m in streamable(diffusion_model).items() if streams(m)}


def working_set(diffusion_model: torch.nn.Module, family: Family, targets: list[TrainTarget], *,
                variant: str, rank: int, optimizer_copies: int, latent_shape: tuple[int, ...],
                context_tokens: int, compute_dtype: torch.dtype, checkpointing: bool,
                streamed: Mapping[str, torch.nn.Module] | None = None,
                num_streams: int | None = None) -> WorkingSet:
    """The :class:`WorkingSet` of a run (module docstring), from what the trainer knows.

    Args:
        diffusion_model: the model (``patcher.model.diffusion_model``; the meta device works).
        family: its :class:`Family` (``checkpoint_blocks`` are the checkpointed blocks).
        targets: the run's adapters (:func:`training.targets.find_targets`).
        variant, rank: the run's adapters; optimizer_copies: the optimizer's parameter-sized
            buffers (:data:`training.optim.STATE_COPIES`).
        latent_shape: a batch's latent, ``(B, C, H, W)`` or ``(B, C, T, H, W)``.
        context_tokens: the conditioning's token count (its ``shape[1]``).
        compute_dtype: the dtype the base runs in (the weights' copies and activations).
        checkpointing: block gradient checkpointing on (always, while anything streams).
        streamed: the layers ComfyUI streams, by name (their casts in flight and the private
            copies backward keeps); :func:`streamable` before a load, :func:`streaming` after.
        num_streams: ComfyUI's offload streams (default ``comfy.model_management.NUM_STREAMS``).
    """
    from .prepare import checkpoint_blocks

    need = adapter_memory(targets, variant, rank, optimizer_copies)
    width = 2 * rank if variant in ORTHO_VARIANTS else rank
    adapters: dict[str, list[TrainTarget]] = {}
    for t in targets:
        adapters.setdefault(t.module, []).append(t)
    blocks = list(checkpoint_blocks(diffusion_model, tuple(family.checkpoint_blocks)))
    layers = _layers(diffusion_model, family, tuple(latent_shape), int(context_tokens), blocks, adapters)
    per, outside = _estimate(layers, blocks, adapters, width, compute_dtype, int(latent_shape[0]), streamed or {})
    activations = outside.saved + outside.weights
    if checkpointing:
        activations += sum(b.inputs for b in per.values())
        recompute = max((b.saved + b.weights + 2 * b.largest for b in per.values()), default=0)
    else:
        activations += sum(b.saved + b.weights for b in per.values())
        recompute = 0
    buffers = offload_buffers(streamed or {}, compute_dtype, num_streams)
    slack = SLACK_FLOOR + int(SLACK_FRACTION * (activations + recompute + buffers))
    return WorkingSet(need["state_bytes"], need["step_factor_bytes"], int(activations), int(recompute),
                      int(buffers), slack)
