"""Sampling the toy model through ComfyUI's own sampler, many prompts in one batch.

One CONDITIONING entry whose context and pooled output have one row per image gives every image
its own prompt (ComfyUI uses a conditioning batch that equals the latent batch as is), so a whole
evaluation set is one ``comfy.sample.sample`` call; T-LoRA Loader's rank mask is per sample, so
this is exact for it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import pixels, text, world

SAMPLER = "euler"
SCHEDULER = "normal"
STEPS = 20
CFG = 4.0


@dataclass(frozen=True)
class Request:
    """One image to generate: its prompt's scene and the seed of its noise."""

    scene: world.Scene
    seed: int


def _batched_conditioning(captions: list[str]) -> list:
    context, pooled = text.encode(captions)
    return [[context, {"pooled_output": pooled, **text.SIZE_CONDS}]]


def noise_for(requests: list[Request]) -> torch.Tensor:
    """Each image's initial noise from its own seed, so it does not depend on the batch."""
    shape = (4, world.SIZE, world.SIZE)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(r.seed))
                        for r in requests])


def generate(model, requests: list[Request], steps: int = STEPS, cfg: float = CFG) -> np.ndarray:
    """(N, SIZE, SIZE, 3) images in [0, 1] for ``requests`` from MODEL ``model``."""
    import comfy.sample

    positive = _batched_conditioning([r.scene.caption() for r in requests])
    negative = _batched_conditioning([""] * len(requests))
    latent = torch.zeros(len(requests), 4, world.SIZE, world.SIZE)
    with torch.inference_mode():
        out = comfy.sample.sample(model, noise_for(requests), steps, cfg, SAMPLER, SCHEDULER,
                                  positive, negative, latent, denoise=1.0, seed=0, disable_pbar=True)
    return pixels.decode(out)
