"""The toy text encoder: seeded word and position embeddings -> ComfyUI SDXL CONDITIONING.

A caption is split on spaces and commas, padded to ``TOKENS`` tokens, and each token becomes its
word's embedding (a fixed random vector seeded from the word itself, so a new word such as ``sks``
has an embedding the base model never saw) plus the embedding of its place in the sentence (word
order tells the colour of the object from the colour of the background). The pooled output is the
mean of the words' embeddings. The empty caption (all padding) is the unconditional prompt.
"""

from __future__ import annotations

import zlib

import torch

WIDTH = 32      # the toy UNet's context_dim and pooled width
TOKENS = 8
PAD = "<pad>"
# SDXL's size conditioning; constant in the toy world.
SIZE_CONDS = {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0,
              "target_width": 1024, "target_height": 1024}


def words(caption: str) -> list[str]:
    tokens = caption.replace(",", " ").split()
    if len(tokens) > TOKENS:
        raise ValueError(f"caption {caption!r} has {len(tokens)} words; the toy encoder takes {TOKENS}")
    return tokens + [PAD] * (TOKENS - len(tokens))


def word_embedding(word: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(word.encode()))
    if word == PAD:
        return torch.zeros(WIDTH)
    return torch.randn(WIDTH, generator=gen)


def position_embeddings() -> torch.Tensor:
    return 0.5 * torch.randn(TOKENS, WIDTH, generator=torch.Generator().manual_seed(7))


def encode(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, TOKENS, WIDTH), pooled (B, WIDTH)) for a list of captions."""
    pos = position_embeddings()
    contexts, pooled = [], []
    for caption in captions:
        tokens = words(caption)
        emb = torch.stack([word_embedding(w) for w in tokens])
        contexts.append(emb + pos)
        real = [e for w, e in zip(tokens, emb) if w != PAD]
        pooled.append(torch.stack(real).mean(0) if real else torch.zeros(WIDTH))
    return torch.stack(contexts), torch.stack(pooled)


def conditioning(caption: str) -> list:
    """ComfyUI CONDITIONING for one caption, as an SDXL text encoder node would return it."""
    context, pooled = encode([caption])
    return [[context, {"pooled_output": pooled, **SIZE_CONDS}]]
