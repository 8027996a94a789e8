"""TEST-ONLY ComfyUI node package: tiny-model stand-ins for the model-loading nodes.

The shipped workflows load real SDXL / FLUX weights, which no test machine has. The workflow tests
convert each graph to API format and swap the loaders (CheckpointLoaderSimple, UNETLoader,
DualCLIPLoader, CLIPLoader, VAELoader) and CLIPTextEncode for these nodes, which return objects of
the same ComfyUI types:

- MODEL: ComfyUI's own SDXL / FLUX classes at tiny widths (``comfy_runtime.build_model``);
- VAE: a real ``comfy.sd.VAE`` around a tiny AutoencoderKL (the real ones' down-scaling and
  latent channels: 8x with 4 for SDXL, 16 for FLUX; 16x with 128 for FLUX.2) with seeded weights;
  for the 5-D latent families (Qwen-Image, Krea 2, Anima) a tiny Wan 2.1 VAE;
- CLIP + CLIPTextEncode: conditioning of the tiny models' widths, seeded by the prompt text, in
  ComfyUI's conditioning format (so FluxGuidance, samplers and the trainer treat it as real).

Only the tests register this package (``register()``); it never ships with the pack.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from comfy_api.latest import ComfyExtension, io

import comfy_runtime
import family_configs

FAMILIES = list(family_configs.TINY)   # the pack's families and their tiny variants (FLUX.2 Klein)
CATEGORY = "T-LoRA tests"
# Smallest AutoencoderKL that keeps the real 8x scale factor: GroupNorm needs 32 channels.
_VAE_CHANNELS = 32


@dataclass(frozen=True)
class TinyClip:
    """Stands in for comfy.sd.CLIP: only TinyCLIPTextEncode reads it."""

    family: str


def _text_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def build_tiny_vae(family: str, seed: int = 0):
    """A real comfy.sd.VAE with a tiny AutoencoderKL of the family's latent channel count and
    scale: 16x for FLUX.2's 128 channels (its VAE's 32 channels patchified 2 x 2, as
    EmptyFlux2LatentImage sizes latents), 8x otherwise; for families with 5-D latents (Qwen-Image, Krea 2, Anima)
    a tiny Wan 2.1 VAE (:func:`build_tiny_wan_vae`)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    if comfy_runtime.family_spec(family).latent_ndim == 5:
        return build_tiny_wan_vae(seed)
    channels = comfy_runtime.latent_channels(family)
    scale = 16 if channels == 128 else 8
    levels = scale.bit_length()   # each level after the first halves the size
    ddconfig = {"double_z": True, "z_channels": channels, "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": _VAE_CHANNELS, "ch_mult": [1] * levels, "num_res_blocks": 1,
                "attn_resolutions": [], "dropout": 0.0}
    params = {"ddconfig": ddconfig, "embed_dim": channels}
    gen = torch.Generator().manual_seed(seed)
    template = AutoencoderKL(**params).state_dict()
    state = {key: 0.05 * torch.randn(value.shape, generator=gen) for key, value in template.items()}
    # fp32: ComfyUI would pick bf16 on some CPUs, which is many times slower there.
    vae = comfy.sd.VAE(sd=state, config={"params": params}, dtype=torch.float32)
    vae.latent_channels = channels
    vae.downscale_ratio = vae.upscale_ratio = scale
    return vae


def build_tiny_wan_vae(seed: int = 0):
    """A real comfy.sd.VAE around ComfyUI's Wan 2.1 VAE class at base width 8 (the real one: 96),
    seeded: ComfyUI recognises it from its keys as it does the real file and reads the width from
    them, so it encodes images to (B, 16, 1, H/8, W/8) latents and decodes them like the real one."""
    import comfy.sd
    from comfy.ldm.wan.vae import WanVAE

    # The configuration ComfyUI builds for a Wan 2.1 VAE file (comfy/sd.py), at width 8.
    config = {"dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
              "temperal_downsample": [False, True, True], "dropout": 0.0}
    gen = torch.Generator().manual_seed(seed)
    template = WanVAE(**config).state_dict()
    state = {key: 0.05 * torch.randn(value.shape, generator=gen) for key, value in template.items()}
    vae = comfy.sd.VAE(sd=state, dtype=torch.float32)
    assert vae.latent_dim == 3 and vae.latent_channels == 16, "ComfyUI did not take it for a Wan 2.1 VAE"
    return vae


def _family_input() -> io.Combo.Input:
    return io.Combo.Input("family", options=FAMILIES, default="sdxl", tooltip="Which tiny model to build.")


class TinyCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRATestTinyCheckpointLoader", display_name="Tiny checkpoint (tests)",
            category=CATEGORY, inputs=[_family_input()],
            outputs=[io.Model.Output(tooltip="tiny model"), io.Clip.Output(tooltip="tiny text encoder"),
                     io.Vae.Output(tooltip="tiny VAE")])

    @classmethod
    def execute(cls, family: str) -> io.NodeOutput:
        return io.NodeOutput(comfy_runtime.build_model(family, seed=0), TinyClip(family),
                             build_tiny_vae(family))


class TinyModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRATestTinyModelLoader", display_name="Tiny diffusion model (tests)",
            category=CATEGORY, inputs=[_family_input()], outputs=[io.Model.Output(tooltip="tiny model")])

    @classmethod
    def execute(cls, family: str) -> io.NodeOutput:
        return io.NodeOutput(comfy_runtime.build_model(family, seed=0))


class TinyClipLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRATestTinyClipLoader", display_name="Tiny text encoder (tests)",
            category=CATEGORY, inputs=[_family_input()], outputs=[io.Clip.Output(tooltip="tiny text encoder")])

    @classmethod
    def execute(cls, family: str) -> io.NodeOutput:
        return io.NodeOutput(TinyClip(family))


class TinyVaeLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRATestTinyVaeLoader", display_name="Tiny VAE (tests)",
            category=CATEGORY, inputs=[_family_input()], outputs=[io.Vae.Output(tooltip="tiny VAE")])

    @classmethod
    def execute(cls, family: str) -> io.NodeOutput:
        return io.NodeOutput(build_tiny_vae(family))


class TinyTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRATestTinyTextEncode", display_name="Tiny text encode (tests)",
            category=CATEGORY,
            inputs=[io.Clip.Input("clip", tooltip="a tiny text encoder"),
                    io.String.Input("text", multiline=True, tooltip="the prompt; seeds the embedding")],
            outputs=[io.Conditioning.Output(tooltip="conditioning of the tiny model's widths")])

    @classmethod
    def execute(cls, clip: TinyClip, text: str) -> io.NodeOutput:
        # Different prompts give different embeddings, the same prompt the same one.
        return io.NodeOutput(comfy_runtime.fake_conditioning(clip.family, seed=_text_seed(text)))


SHARED: dict[str, object] = {}
"""Models a test hands to a prompt through :class:`SharedModel` (e.g. one ComfyUI's own loader made)."""


class SharedModel(io.ComfyNode):
    """The MODEL a test put in :data:`SHARED` under ``key``: the same object in every prompt, as a
    loader node's cached output is."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRATestSharedModel", display_name="Shared model (tests)", category=CATEGORY,
            inputs=[io.String.Input("key", tooltip="the test's key in tiny_nodes.SHARED")],
            outputs=[io.Model.Output(tooltip="that model")])

    @classmethod
    def execute(cls, key: str) -> io.NodeOutput:
        return io.NodeOutput(SHARED[key])


class ZeroLatentAfter(io.ComfyNode):
    """An all-zero latent (what the empty-latent nodes give) shaped like ``after``: a sampler fed
    with it starts from the empty latent but runs only once ``after`` exists (ordering in tests)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRATestZeroLatentAfter", display_name="Zero latent after (tests)",
            category=CATEGORY, inputs=[io.Latent.Input("after", tooltip="any latent; only its shape is used")],
            outputs=[io.Latent.Output(tooltip="zeros of that shape")])

    @classmethod
    def execute(cls, after: dict) -> io.NodeOutput:
        return io.NodeOutput({"samples": torch.zeros_like(after["samples"])})


NODES: list[type[io.ComfyNode]] = [TinyCheckpointLoader, TinyModelLoader, TinyClipLoader, TinyVaeLoader,
                                   TinyTextEncode, ZeroLatentAfter, SharedModel]


class TinyNodesExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> TinyNodesExtension:
    return TinyNodesExtension()


def register() -> None:
    """Add the tiny nodes to ComfyUI's in-process registry (idempotent; tests only)."""
    import nodes

    for node_cls in NODES:
        schema = node_cls.GET_SCHEMA()
        nodes.NODE_CLASS_MAPPINGS[schema.node_id] = node_cls
        nodes.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] = schema.display_name
