"""One run of T-LoRA Train, from the node's inputs to the saved file applied to the output MODEL.

Contract. :func:`resolve_config` fills the family's recipe defaults (``Family.recipe``,
:mod:`tlora_core.families`) into the inputs; :func:`prepare_job` runs every check that can fail
(family, numbers, optimizer and timestep choices, latents, conditioning, ranks, mask, resume
state, output name) before any GPU work or file is touched; :func:`run_job` trains
(:func:`training.loop.train`), saves the T-LoRA and its training state atomically into the
``loras`` folder (also every ``save_every`` steps), and returns the MODEL with the saved file
applied exactly as the T-LoRA Loader applies it (the caller's ``reload``), so what the graph
samples with is what the file holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import comfy.utils
import torch

from ..tlora_core.families import Family
from ..tlora_core.files.write import save_tlora
from ..tlora_core.inventory import inventory_from_module
from ..tlora_core.schedule import AUTO_MIN_RANK, default_min_rank
from . import inputs, lora_folder, optim, report, runtime_fixes, validation
from . import state as state_io
from .loop import COMPUTE_DTYPES, TrainConfig, train
from .modules import adapter_key
from .targets import find_targets
from .timesteps import check_sampling, family_rule

log = logging.getLogger(__name__)

VARIANT_CHOICES = {"auto": None, "T-LoRA": "tlora", "Vanilla T-LoRA": "vanilla",
                   "Ortho-LoRA": "ortho", "LoRA": "lora"}
"""The node's variant names -> variant ids; auto = the family recipe's."""
LEGACY_AUTO_MIN_RANK = 0
"""Workflows saved before min_rank's automatic value was unified to -1 hold 0: the same meaning."""
NO_RESUME = "none"
PREVIEW_EVERY = 10


def resolve_config(family: Family, *, variant: str, rank: int, min_rank: int, schedule_power: float,
                   steps: int, learning_rate: float, batch_size: int, seed: int, target_layers: str,
                   training_dtype: str, gradient_checkpointing: bool, save_every: int,
                   optimizer: str = "AdamW", lr_schedule: str = "constant", warmup_steps: int = 0,
                   timestep_sampling: str = "uniform", logit_mean: float = 0.0,
                   logit_std: float = 1.0, max_vram_gb: float = 0.0) -> TrainConfig:
    """The node's inputs with the family's recipe defaults filled in (not yet validated)."""
    if variant not in VARIANT_CHOICES:
        raise ValueError(f"unknown variant {variant!r} (choices: {', '.join(VARIANT_CHOICES)})")
    if training_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown training_dtype {training_dtype!r}")
    recipe = family.recipe
    rank = int(rank) or recipe.rank
    if min_rank in (AUTO_MIN_RANK, LEGACY_AUTO_MIN_RANK):
        min_rank = default_min_rank(rank) if rank >= 1 else 1
    return TrainConfig(variant=VARIANT_CHOICES[variant] or recipe.variant, rank=rank,
                       min_rank=int(min_rank), schedule_power=float(schedule_power), steps=int(steps),
                       learning_rate=float(learning_rate), batch_size=int(batch_size), seed=int(seed),
                       scope=target_layers, compute_dtype=training_dtype,
                       gradient_checkpointing=bool(gradient_checkpointing) or recipe.needs_checkpointing,
                       save_every=int(save_every), optimizer=optimizer, lr_schedule=lr_schedule,
                       warmup_steps=int(warmup_steps), timestep_sampling=timestep_sampling,
                       logit_mean=float(logit_mean), logit_std=float(logit_std),
                       max_vram_gb=float(max_vram_gb))


@dataclass
class TrainJob:
    """Validated inputs of one run: tensors, the output path and the state to resume from."""

    samples: torch.Tensor
    weights: torch.Tensor | None
    positive: list
    family: Family
    path: Path
    resume: state_io.TrainingState | None
    inventory: dict


def prepare_job(model, latents, positive, mask, config: TrainConfig, file_name: str,
                resume_from: str) -> TrainJob:
    """Every check that can fail, before any GPU work or file is touched."""
    base = model.model
    family = inputs.family_of(base)
    rule = family_rule(family, model.get_model_object("model_sampling"))
    runtime_fixes.resolve(family)
    inputs.check_numbers(config.steps, config.batch_size, config.learning_rate, config.save_every,
                         config.schedule_power)
    optim.check_choices(config.optimizer, config.lr_schedule, config.warmup_steps, config.steps,
                        config.learning_rate)
    check_sampling(rule, config.timestep_sampling, config.logit_mean, config.logit_std, family.label)
    samples = inputs.latent_samples(latents, base, family)
    inputs.check_conditioning(positive, base, family, samples.shape[0])
    targets = find_targets(base.diffusion_model, family, config.scope)
    inputs.check_rank(config.variant, config.rank, config.min_rank, targets)
    weights = inputs.loss_weights(mask, samples, family.latent_downscale)
    resume = resume_path = None
    if resume_from and resume_from != NO_RESUME:
        resume_path = lora_folder.resolve_resume(resume_from)
        resume = state_io.load_state(state_io.state_path(resume_path))
        state_io.check_compatible(resume, {"architecture": family.id, "variant": config.variant,
                                           "rank": config.rank, "scope": config.scope},
                                  [adapter_key(t) for t in targets], config.steps,
                                  config.resume_options())
        for difference in state_io.draw_differences(resume, config.draws()):
            log.warning("T-LoRA Train: resuming %s with %s: the run goes on, but its images, noise "
                        "and noise levels are no longer the ones an uninterrupted run would draw",
                        resume_path.name, difference)
    path = lora_folder.output_path(file_name, resume_path)
    return TrainJob(samples, weights, positive, family, path, resume,
                    inventory_from_module(base.diffusion_model))


def _save(path: Path, weights, state, config: TrainConfig, job: TrainJob, step: int) -> None:
    extra = {"tlora.training": config.as_json(step=step, images=int(job.samples.shape[0]),
                                              architecture=job.family.id),
             "modelspec.title": path.stem}
    save_tlora(path, weights, extra_metadata=extra, inventory=job.inventory)
    state_io.save_state(state_io.state_path(path), state)


def _progress(config: TrainConfig, job: TrainJob, node_id, send_text: Callable[[str], None] | None,
              validator: validation.Validator | None = None):
    bar = comfy.utils.ProgressBar(config.steps, node_id=node_id)
    if job.resume is not None:
        bar.update_absolute(job.resume.step, config.steps)
    seen: list[list[float]] = [[]]   # the run's loss list (the loop appends to it)

    def image(losses):
        curve = report.loss_curve(losses)
        return curve if validator is None else validator.preview(curve)

    def on_step(step, total, loss, losses):
        seen[0] = losses
        preview = None
        if step % PREVIEW_EVERY == 0 or step == total:
            preview = ("JPEG", image(losses), report.WIDTH)
        bar.update_absolute(step, total, preview)
        if send_text is not None:
            send_text(report.progress_text(step, total, loss, losses))

    if validator is not None:
        # A new validation image is shown at once, not at the next preview step.
        validator.show = lambda step: bar.update_absolute(step, config.steps,
                                                          ("JPEG", image(seen[0]), report.WIDTH))
    return on_step


def run_job(model, job: TrainJob, config: TrainConfig, reload: Callable[[object, str], object], *,
            node_id=None, send_text: Callable[[str], None] | None = None,
            validator: validation.Validator | None = None):
    """Train, save, and return (MODEL with the saved T-LoRA applied, saved path, losses).

    ``reload(model, lora_name)``: the T-LoRA Loader's own read-and-apply of a file in the loras
    folder, returning a patched clone of ``model``. ``validator``: validation samples during the
    run (:mod:`training.validation`), None = none.
    """
    with torch.inference_mode(False):
        data = inputs.prepare_data(model.model, job.family, job.samples, job.positive, job.weights,
                                   model.load_device)

    def on_save(step, weights, state):
        _save(lora_folder.intermediate_path(job.path, step), weights, state, config, job, step)

    def on_final(step, weights, state):
        _save(job.path, weights, state, config, job, step)

    result = train(model, data, config, resume=job.resume,
                   on_step=_progress(config, job, node_id, send_text, validator), on_save=on_save,
                   on_final=on_final, on_validate=None if validator is None else validator.sample,
                   validate_every=0 if validator is None else validator.settings.every)
    out = reload(model, lora_folder.display_name(job.path))
    log.info("T-LoRA Train: saved %s after %d steps (final loss %.4f)", job.path, result.step,
             result.losses[-1] if result.losses else float("nan"))
    return out, job.path, result.losses
