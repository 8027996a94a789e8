"""The toy "VAE": 16x16 RGB images <-> 4-channel SDXL latents, a fixed invertible map.

Model space (what the UNet sees after ComfyUI's ``process_latent_in``) is the image in [-1, 1] on
channels 0-2 and its grey level on channel 3. The LATENT is that divided by SDXL's latent scale
factor, so ComfyUI's sampler and T-LoRA Train treat it exactly like an SDXL VAE's output.
"""

from __future__ import annotations

import numpy as np
import torch

SDXL_SCALE_FACTOR = 0.13025  # comfy.latent_formats.SDXL.scale_factor


def to_model_space(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) in [0, 1] -> (B, 4, H, W) model-space tensor."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32).permute(0, 3, 1, 2) * 2 - 1
    return torch.cat([x, x.mean(1, keepdim=True)], dim=1)


def encode(images: np.ndarray | torch.Tensor) -> dict:
    """A ComfyUI LATENT for (B, H, W, 3) images in [0, 1]."""
    return {"samples": to_model_space(images) / SDXL_SCALE_FACTOR}


def decode(samples: torch.Tensor) -> np.ndarray:
    """(B, 4, H, W) LATENT samples -> (B, H, W, 3) float images in [0, 1]."""
    x = samples.float() * SDXL_SCALE_FACTOR
    return ((x[:, :3].permute(0, 2, 3, 1).clamp(-1, 1) + 1) / 2).numpy()
