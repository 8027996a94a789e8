"""Checking the trainer's inputs before any GPU work, and turning them into training tensors.

Every check raises ``ValueError`` with a message that says what is wrong and what to do: a model
of a family the pack does not know, a latent from another model family (channel count, 4-D vs
5-D), empty or mismatched conditioning, a rank that does not
fit the adapted layers, a min_rank outside [1, rank], zero steps, a subject mask whose size is
neither the image's nor the latent's. :func:`prepare_data` runs with inference mode off and clones
every tensor it keeps, because tensors made by other nodes are inference tensors that autograd
refuses to save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import comfy.sampler_helpers
import comfy.samplers
import torch

from ..tlora_core import families
from ..tlora_core.adapter import VARIANTS
from ..tlora_core.families import Family, TrainTarget
from ..tlora_core.schedule import default_min_rank

MAX_RANK = 512


def family_of(model) -> Family:
    """The family of a ComfyUI BaseModel (:func:`tlora_core.families.recognise`); ValueError naming
    the model's class and the families the pack knows otherwise."""
    return families.recognise(model)


def _vae_families(channels: int) -> str:
    known = [f.label for f in families.all_families() if f.latent_channels == channels]
    return "/".join(known) if known else "another model"


def latent_samples(latents: dict, model, family: Family) -> torch.Tensor:
    """The LATENT's ``samples`` (N, C, H, W), or (N, C, T, H, W) for 5-D families, checked against
    the model family."""
    if not isinstance(latents, dict) or not torch.is_tensor(latents.get("samples")):
        raise ValueError("latents must be a LATENT (a VAE Encode output), got "
                         f"{type(latents).__name__}")
    samples = latents["samples"]
    layout = "(images, channels, height, width)" if family.latent_ndim == 4 else \
        "(images, channels, frames, height, width)"
    if samples.ndim != family.latent_ndim or samples.shape[0] < 1 or min(samples.shape[2:]) < 1:
        raise ValueError(f"the LATENT has shape {tuple(samples.shape)}; this {family.label} MODEL "
                         f"expects {layout} with at least one image")
    channels = model.latent_format.latent_channels
    if samples.shape[1] != channels:
        raise ValueError(
            f"the LATENT has {samples.shape[1]} channels (made by the VAE of "
            f"{_vae_families(samples.shape[1])}) but this {family.label} MODEL needs {channels}: "
            "encode the image with the VAE of the model being trained.")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("the LATENT contains NaN or Inf values; re-encode the image")
    return samples


def check_conditioning(positive, model, family: Family, images: int) -> None:
    """One CONDITIONING entry for every image, or one per image, with the model's widths."""
    if not isinstance(positive, list) or len(positive) == 0:
        raise ValueError("the positive CONDITIONING is empty: connect a text encoder output "
                         "(e.g. CLIP Text Encode with the prompt 'a photo of sks dog')")
    if len(positive) not in (1, images):
        raise ValueError(f"the CONDITIONING has {len(positive)} entries for {images} images: give one "
                         "prompt for all images or exactly one per image (Conditioning Combine "
                         "of per-image prompts, in image order)")
    ctx_dim, pooled_dim = family.conditioning_widths(model.model_config.unet_config)
    for i, entry in enumerate(positive):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not torch.is_tensor(entry[0]):
            raise ValueError(f"CONDITIONING entry {i} is not a [tensor, options] pair")
        ctx, extra = entry[0], entry[1]
        if ctx.ndim != 3 or ctx.shape[1] == 0:
            raise ValueError(f"CONDITIONING entry {i} has shape {tuple(ctx.shape)}: no text tokens. "
                             "Encode a non-empty prompt.")
        if ctx_dim is not None and ctx.shape[-1] != ctx_dim:
            raise ValueError(f"the CONDITIONING has width {ctx.shape[-1]} but this {family.label} "
                             f"model expects {ctx_dim}: encode the prompt with the CLIP of the same "
                             "checkpoint as the MODEL.")
        pooled = extra.get("pooled_output") if isinstance(extra, dict) else None
        if not family.pooled_output:
            continue
        if pooled is None:
            raise ValueError(f"CONDITIONING entry {i} has no pooled output; {family.label} needs "
                             "one: use the model's own CLIP Text Encode node.")
        if pooled_dim is not None and pooled.shape[-1] != pooled_dim:
            raise ValueError(f"the CONDITIONING's pooled output has width {pooled.shape[-1]}, this "
                             f"model expects {pooled_dim}: encode with the model's own CLIP.")


def check_rank(variant: str, rank: int, min_rank: int, targets: list[TrainTarget]) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    if isinstance(rank, bool) or int(rank) != rank or not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank must be a whole number in [1, {MAX_RANK}], got {rank}")
    narrowest = min(min(t.rows, t.in_features) for t in targets)
    if rank > narrowest:
        raise ValueError(f"rank {rank} is larger than the narrowest adapted layer ({narrowest} "
                         f"features); use rank <= {narrowest}")
    if variant in ("tlora", "vanilla") and not 1 <= min_rank <= rank:
        raise ValueError(f"min_rank must be in [1, rank={rank}], got {min_rank} (the paper "
                         f"recommends half the rank: {default_min_rank(rank)})")


def check_numbers(steps: int, batch_size: int, learning_rate: float, save_every: int,
                  schedule_power: float) -> None:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate}")
    if int(save_every) != save_every or save_every < 0:
        raise ValueError(f"save_every must be 0 (off) or a positive number of steps, got {save_every}")
    if not (math.isfinite(schedule_power) and schedule_power > 0):
        raise ValueError(f"schedule_power must be a positive number, got {schedule_power}")


def loss_weights(mask: torch.Tensor | None, samples: torch.Tensor, downscale: int) -> torch.Tensor | None:
    """The subject MASK as per-image loss weights at latent size, or None: (N, 1, h, w) for 4-D
    latents, (N, 1, 1, h, w) for 5-D ones (:func:`latent_weight_shape`), broadcastable on them.

    The mask must have the image's size (latent size x ``downscale``, the family's
    ``latent_downscale``) or the latent's size, and one mask for all images or one per image.
    Resized by area averaging (soft edges stay soft).
    """
    if mask is None:
        return None
    n, (h, w) = samples.shape[0], samples.shape[-2:]
    m = mask if mask.ndim == 3 else mask.reshape(1, *mask.shape[-2:])
    if m.ndim != 3:
        raise ValueError(f"the mask has shape {tuple(mask.shape)}; expected (height, width) or "
                         "(masks, height, width)")
    size = tuple(m.shape[-2:])
    if size not in ((h, w), (h * downscale, w * downscale)):
        raise ValueError(f"the mask is {size[1]}x{size[0]} but the image is {w * downscale}x"
                         f"{h * downscale} (latent {w}x{h}); use a mask of the training image's size")
    if m.shape[0] not in (1, n):
        raise ValueError(f"{m.shape[0]} masks for {n} images: give one mask for all or one per image")
    m = m.detach().clone().float().clamp(0, 1)[:, None]
    if size != (h, w):
        m = torch.nn.functional.interpolate(m, size=(h, w), mode="area")
    m = m.expand(n, -1, -1, -1).clone()
    empty = [i for i in range(n) if float(m[i].sum()) <= 0]
    if empty:
        raise ValueError(f"the mask is empty for image(s) {empty}: mark the subject (white = train)")
    return m.reshape(latent_weight_shape(samples))


def latent_weight_shape(samples: torch.Tensor) -> tuple[int, ...]:
    """The shape of per-image, per-pixel weights on ``samples``: (N, 1, h, w), or (N, 1, 1, h, w)
    for 5-D latents (B, C, T, H, W) such as the Wan 2.1 VAE's (Qwen-Image, Krea 2, Anima)."""
    n, h, w = samples.shape[0], *samples.shape[-2:]
    return (n, 1, *([1] * (samples.ndim - 4)), h, w)


@dataclass
class TrainingData:
    """Everything the loop draws from, as ordinary (non-inference) tensors."""

    latents: torch.Tensor                  # (N, C, H, W) / (N, C, T, H, W) float32, model space
    conds: list[dict]                      # per image: {apply_model kwarg: CONDRegular, batch 1}
    weights: torch.Tensor | None           # latent_weight_shape loss weights or None

    @property
    def images(self) -> int:
        return self.latents.shape[0]

    def batch(self, indices: list[int], device: torch.device) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
        x0 = self.latents[indices].to(device)
        try:
            conds = comfy.samplers.cond_cat([self.conds[i] for i in indices])
        except RuntimeError as err:
            raise ValueError("the images' prompts have different token lengths and cannot share a "
                             "batch; use batch_size 1 or prompts of equal length") from err
        conds = {k: v.to(device) if torch.is_tensor(v) else v for k, v in conds.items()}
        weights = None if self.weights is None else self.weights[indices].to(device)
        return x0, conds, weights


def prepare_data(model, family: Family, samples: torch.Tensor, positive: list,
                 weights: torch.Tensor | None, device: torch.device) -> TrainingData:
    """Latents in model space and each image's encoded conditioning (ComfyUI's ``extra_conds``).

    Families with a distilled guidance input train at ``recipe.training_guidance`` (FLUX: 1.0, as
    the reference code; the distilled guidance is for sampling).
    """
    latents = model.process_latent_in(samples.detach().clone().float())
    conds = []
    for i in range(latents.shape[0]):
        ctx, extra = positive[i if len(positive) > 1 else 0][:2]
        extra = dict(extra)
        if not family.pooled_output:
            # Some runtimes' model classes read the key even where the family has no pooled vector.
            extra.setdefault("pooled_output", None)
        if family.recipe.training_guidance is not None:
            extra["guidance"] = family.recipe.training_guidance
        entry = comfy.sampler_helpers.convert_cond([[ctx.detach().clone(), _clone_tensors(extra)]])
        x = latents[i:i + 1]
        encoded = comfy.samplers.encode_model_conds(model.extra_conds, entry, x, device, "positive",
                                                    latent_image=x)
        conds.append({k: v.process_cond(batch_size=1, area=None)
                      for k, v in encoded[0]["model_conds"].items()})
    return TrainingData(latents, conds, None if weights is None else weights.detach().clone())


def _clone_tensors(d: dict) -> dict:
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in d.items()}
