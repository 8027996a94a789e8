"""Validation samples during T-LoRA training: the adapter as trained so far, sampled the Loader's way.

Contract. Every ``every`` steps and after the last step, :meth:`Validator.sample` receives the
adapter in its saved-file form (:func:`training.loop.build_weights`) and the loaded training clone
with the training hooks off (:func:`training.loop.train`). It installs the weights on a clone of
that patcher with the T-LoRA Loader's own code (the node passes ``nodes.patch.install``: the one
per-step rank mask) and runs ComfyUI's own sampler (``comfy.sample.sample``, the KSampler path) on an empty
latent of the training latent's layout (5-D for the Wan-VAE families). The result is decoded with
the VAE if one is given, else by ComfyUI's own latent-to-RGB previewer (the fast "latent2rgb"
sampling preview, at latent size, of the latent in the model's space as the sampler shows it); a
video-shaped result gives its first frame. Each image is written as ``<file>_stepNNNNN.png`` beside
the ``save_every`` checkpoints (atomically, full size) and kept for the grid and the live preview
as a thumbnail (at most ``THUMBNAIL`` pixels a side, so a long run's grid stays small). Without a
negative prompt the positive stands in for it and CFG is skipped (1.0): the same image at half the
model calls.

Isolation: the sampling noise comes from its own generator (seeded by ``seed``), the global RNG
state (CPU and CUDA) is saved and restored around the sample, no gradient is recorded, and the
training clone is loaded again afterwards (ComfyUI's loader swaps it for the sampling clone), on
every exit: a run gives the same adapter with and without validation. Cancel is checked at every
sampler step and leaves through the same path as Cancel during a training step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management
import comfy.sample
import comfy.samplers
import latent_preview
import torch
from PIL import Image, ImageDraw

from ..tlora_core.files.atomic import atomic_write
from . import inputs, lora_folder, report
from .prepare import reload

SAMPLERS = comfy.samplers.KSampler.SAMPLERS
SCHEDULERS = comfy.samplers.KSampler.SCHEDULERS
TILE_LABEL = 14   # pixels of the step label above each grid tile
THUMBNAIL = 512   # the largest side of a validation image in the grid and the live preview


@dataclass
class ValidationSettings:
    """The node's validation inputs; ``every`` 0 = off. ``width`` / ``height`` 0 = the training
    latent's size. ``negative`` None = the positive (CFG then has no effect)."""

    every: int = 0
    positive: list | None = None
    negative: list | None = None
    steps: int = 20
    cfg: float = 5.0
    seed: int = 0
    width: int = 0
    height: int = 0
    sampler: str = "euler"
    scheduler: str = "normal"
    vae: object | None = None

    @property
    def on(self) -> bool:
        return self.every > 0


def latent_shape(settings: ValidationSettings, family, training: torch.Size) -> tuple[int, ...]:
    """The validation latent's shape: one sample in the training latent's layout ((1, C, h, w), or
    (1, C, 1, h, w) for 5-D latents), h and w the pixel size / the family's ``latent_downscale``."""
    down = family.latent_downscale
    h = settings.height // down if settings.height else training[-2]
    w = settings.width // down if settings.width else training[-1]
    return (1, *training[1:-2], h, w)


def check(settings: ValidationSettings, model, family, samples: torch.Tensor) -> None:
    """Every way the validation inputs can be wrong, before any GPU work (ValueError)."""
    if not settings.on:
        return
    if settings.positive is None:
        raise ValueError("validation_every is set but validation_positive is not connected: connect the "
                         "prompt to sample with (a CLIP Text Encode), or set validation_every to 0")
    for name, cond in (("validation_positive", settings.positive), ("validation_negative", settings.negative)):
        if cond is not None:
            try:
                inputs.check_conditioning(cond, model.model, family, 1)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from err
    if settings.sampler not in SAMPLERS:
        raise ValueError(f"unknown validation_sampler {settings.sampler!r} (choices: {', '.join(SAMPLERS)})")
    if settings.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown validation_scheduler {settings.scheduler!r} "
                         f"(choices: {', '.join(SCHEDULERS)})")
    shape = latent_shape(settings, family, samples.shape)
    if min(shape[-2:]) < 1:
        raise ValueError(f"validation size {settings.width}x{settings.height} is smaller than one latent "
                         f"pixel ({family.latent_downscale} pixels for {family.label}); use 0 (the "
                         f"training image's size) or at least {family.latent_downscale}")
    latent_format = model.model.latent_format
    if settings.vae is None and getattr(latent_format, "latent_rgb_factors", None) is None:
        raise ValueError(f"{family.label} has no latent preview colours: connect validation_vae to see "
                         "validation samples")
    vae_channels = getattr(settings.vae, "latent_channels", None)
    if vae_channels is not None and vae_channels != latent_format.latent_channels:
        raise ValueError(f"validation_vae makes {vae_channels}-channel latents, but this {family.label} "
                         f"model's have {latent_format.latent_channels}: connect the VAE of the model "
                         "being trained")


def _rng_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _interrupt_check(*_args) -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def to_image(settings: ValidationSettings, latent_format, samples: torch.Tensor) -> Image.Image:
    """The first sample (a sampler's output, in the VAE's latent space) as an RGB picture (the
    first frame of a video-shaped one)."""
    if settings.vae is not None:
        pixels = settings.vae.decode(samples)
        pixels = pixels.reshape(-1, *pixels.shape[-3:])   # (B, T, H, W, C) -> frames, as VAE Decode does
        rgb = pixels[0, ..., :3].float().cpu().clamp(0, 1)
        return Image.fromarray((rgb.numpy() * 255.0).round().astype("uint8"))
    # ComfyUI's latent2rgb sampling preview for this latent format (its colour factors, bias and
    # any unpatchifying reshape, e.g. FLUX.2's 128 channels as 32 at twice the size). Its factors
    # are for the model's space, where the sampler's previews live: the sampler's output is in the
    # VAE's (process_latent_out), so it goes back through process_in first.
    previewer = latent_preview.Latent2RGBPreviewer(
        latent_format.latent_rgb_factors, getattr(latent_format, "latent_rgb_factors_bias", None),
        getattr(latent_format, "latent_rgb_factors_reshape", None))
    return previewer.decode_latent_to_preview(latent_format.process_in(samples.float().cpu())).convert("RGB")


def _thumbnail(image: Image.Image) -> Image.Image:
    scale = THUMBNAIL / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.LANCZOS)


def png_path(output: Path, step: int) -> Path:
    """``<file>_stepNNNNN.png``: the checkpoint name of ``step`` with a PNG suffix."""
    return lora_folder.intermediate_path(output, step).with_suffix(".png")


class Validator:
    """The validation samples of one run: sampling, files, the progress preview and the grid.

    ``show``, when set (the job's progress bar does), is called with the step after each new image.
    """

    def __init__(self, settings: ValidationSettings, output: Path, shape: tuple[int, ...],
                 install: Callable) -> None:
        self.settings = settings
        self.install = install            # the Loader's install(patcher, weights, strength)
        self.output = output
        self.shape = shape                # the validation latent's (:func:`latent_shape`)
        self.show: Callable[[int], None] | None = None
        self.thumbnails: list[tuple[int, Image.Image]] = []   # (step, image), in step order

    def sample(self, step: int, weights, patcher) -> None:
        """:data:`training.loop.ValidateCallback`: one validation image at ``step``."""
        s = self.settings
        latent_format = patcher.model.latent_format
        sampling = patcher.clone()
        self.install(sampling, weights, 1.0)
        try:
            # Under inference mode, as ComfyUI's sampler nodes run: loaded outside it, ComfyUI's
            # quantized layers would swap the MODEL's weights for non-inference clones.
            with torch.random.fork_rng(devices=_rng_devices()), torch.inference_mode():
                latent = torch.zeros(self.shape)
                noise = torch.randn(self.shape, generator=torch.Generator().manual_seed(s.seed))
                # No negative: the positive stands in, and CFG 1 skips the identical second pass.
                negative, cfg = (s.negative, s.cfg) if s.negative is not None else (s.positive, 1.0)
                out = comfy.sample.sample(sampling, noise, s.steps, cfg, s.sampler, s.scheduler,
                                          s.positive, negative, latent, seed=s.seed,
                                          callback=_interrupt_check, disable_pbar=True)
                image = to_image(s, latent_format, out)
        finally:
            # ComfyUI's loader swapped the sampling clone in: put the training clone back.
            reload(patcher)
            del sampling
        atomic_write(png_path(self.output, step), lambda tmp: image.save(tmp, format="PNG"))
        self.thumbnails.append((step, _thumbnail(image)))
        if self.show is not None:
            self.show(step)

    def latest(self) -> Image.Image | None:
        return self.thumbnails[-1][1] if self.thumbnails else None

    def preview(self, curve: Image.Image) -> Image.Image:
        """The progress preview: the loss curve, and under it the newest validation image."""
        latest = self.latest()
        if latest is None:
            return curve
        scale = min(report.WIDTH / latest.width, report.HEIGHT / latest.height)
        tile = latest.resize((max(1, round(latest.width * scale)), max(1, round(latest.height * scale))),
                             Image.NEAREST)
        out = Image.new("RGB", (curve.width, curve.height + tile.height + TILE_LABEL), "white")
        out.paste(curve, (0, 0))
        ImageDraw.Draw(out).text((4, curve.height + 1), f"validation, step {self.thumbnails[-1][0]}",
                                 fill=(0, 0, 0))
        out.paste(tile, ((curve.width - tile.width) // 2, curve.height + TILE_LABEL))
        return out

    def grid(self) -> torch.Tensor:
        """IMAGE (1, H, W, 3): every validation image (as its thumbnail), in step order, each under
        its step."""
        if not self.thumbnails:
            return placeholder()
        w, h = self.thumbnails[0][1].size
        cols = math.ceil(math.sqrt(len(self.thumbnails)))
        rows = math.ceil(len(self.thumbnails) / cols)
        out = Image.new("RGB", (cols * w, rows * (h + TILE_LABEL)), "white")
        draw = ImageDraw.Draw(out)
        for i, (step, image) in enumerate(self.thumbnails):
            x, y = (i % cols) * w, (i // cols) * (h + TILE_LABEL)
            draw.text((x + 2, y + 1), f"step {step}", fill=(0, 0, 0))
            out.paste(image, (x, y + TILE_LABEL))
        return report.image_tensor(out)


def placeholder() -> torch.Tensor:
    """IMAGE (1, 64, 256, 3): the ``validation`` output of a run without validation."""
    img = Image.new("RGB", (256, 64), "white")
    ImageDraw.Draw(img).text((8, 24), "validation off (validation_every 0)", fill=(0, 0, 0))
    return report.image_tensor(img)
