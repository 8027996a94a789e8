"""T-LoRA Train: single-image T-LoRA fine-tuning in-process, on the MODEL already in the graph.

Thin node: reads the inputs, fills in the per-family recipe defaults, validates everything before
any GPU work, runs :func:`training.loop.train`, saves the file atomically into ComfyUI's ``loras``
folder and returns the MODEL with the trained T-LoRA applied by the Loader's own mechanism.
"""

from __future__ import annotations

import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io

from ..tlora_core.file_format import save_tlora
from ..tlora_core.schedule import resolve_min_rank
from ..tlora_core.validate import inventory_from_module
from ..training import files, inputs, report
from ..training import state as state_io
from ..training.loop import COMPUTE_DTYPES, TrainConfig, train
from ..training.modules import adapter_key
from ..training.targets import SCOPES, find_targets
from .loader import read_tlora
from .patch import install

log = logging.getLogger(__name__)

VARIANT_CHOICES = {"auto": None, "T-LoRA": "tlora", "Vanilla T-LoRA": "vanilla",
                   "Ortho-LoRA": "ortho", "LoRA": "lora"}
# The reference code's recipe per family (see the tooltips for the reasons).
FAMILY_DEFAULTS = {"sdxl": {"variant": "tlora", "rank": 64}, "flux": {"variant": "vanilla", "rank": 32}}
NO_RESUME = "none"
PREVIEW_EVERY = 10


def _inputs() -> list:
    return [
        io.Model.Input("model", tooltip="The SDXL or FLUX model to personalise, as loaded in the graph "
                       "(any dtype; LoRAs applied before this node become part of the base). It is "
                       "not modified: the trained T-LoRA is applied to the output MODEL only."),
        io.Latent.Input("latents", tooltip="The training image(s), VAE-encoded with this model's VAE. "
                        "One image is the paper's setting; a batch of 2-3 images also works. Centre-"
                        "cropped 1024x1024 (SDXL) matches the reference recipe."),
        io.Conditioning.Input("positive", tooltip="The training prompt, e.g. 'a photo of sks dog' "
                              "(rare token + class, the reference template). One prompt for all "
                              "images, or one per image in image order."),
        io.Combo.Input("variant", options=list(VARIANT_CHOICES), default="auto", tooltip=(
            "T-LoRA = Ortho-LoRA init + timestep rank mask (the paper's method). Vanilla T-LoRA = "
            "mask without the Ortho init; Ortho-LoRA = Ortho init without mask; LoRA = plain LoRA "
            "(the paper's baselines). auto = T-LoRA on SDXL, Vanilla T-LoRA on FLUX (the reference "
            "code trains FLUX only that way).")),
        io.Int.Input("rank", default=0, min=0, max=inputs.MAX_RANK, tooltip=(
            "Adapter rank r. 0 = the reference recipe: 64 on SDXL, 32 on FLUX. Higher keeps more "
            "detail but memorises pose and background sooner.")),
        io.Int.Input("min_rank", default=0, min=0, max=inputs.MAX_RANK, tooltip=(
            "Ranks still active at the noisiest timestep (r_min). 0 = half the rank, the paper's "
            "recommendation (a quarter loses fidelity); the reference FLUX script uses 1. Ignored "
            "by Ortho-LoRA and LoRA.")),
        io.Float.Input("schedule_power", default=1.0, min=0.05, max=10.0, step=0.05, tooltip=(
            "Exponent of the rank schedule r(t) = (r - r_min) * ((T - t) / T)^power + r_min. 1 = the "
            "paper's linear schedule; > 1 masks more ranks at mid timesteps.")),
        io.Int.Input("steps", default=800, min=1, max=100000, tooltip=(
            "Optimizer steps. The paper trains T-LoRA and Ortho-LoRA 800 steps, LoRA and Vanilla "
            "T-LoRA 500 (SDXL, batch 1).")),
        io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6, round=1e-7, tooltip=(
            "AdamW learning rate (betas 0.9/0.999, weight decay 1e-4, constant), the paper's setting "
            "for SDXL. The reference FLUX script uses the Prodigy optimizer instead; this node keeps "
            "AdamW (no extra dependency), for which 1e-4 is a usual FLUX LoRA rate.")),
        io.Int.Input("batch_size", default=1, min=1, max=64, tooltip=(
            "Samples per step (batch 1 in the paper). With one image, a batch of 2 trains the image "
            "at two noise levels per step; each sample gets the rank mask of its own timestep.")),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip=(
            "Seeds the adapter init, timesteps and noise: the same seed and inputs give the same "
            "T-LoRA. A resumed run with the same seed continues exactly as an uninterrupted one.")),
        io.Combo.Input("target_layers", options=list(SCOPES), default="attention", tooltip=(
            "attention = the layers the paper adapts (SDXL to_q/k/v/out of every attention; FLUX "
            "q/k/v and output of the attention). attention+ff also adapts the feed-forward layers "
            "(more capacity, bigger file).")),
        io.Combo.Input("training_dtype", options=list(COMPUTE_DTYPES), default="auto", tooltip=(
            "Compute dtype of the frozen base model during training. auto = the model's own. bf16 "
            "fits SDXL in 24 GB with checkpointing; use bf16 rather than fp16 (fp16 gradients can "
            "overflow). The adapters always train in fp32.")),
        io.Boolean.Input("gradient_checkpointing", default=True, tooltip=(
            "Recompute each block's activations in backward instead of storing them: much less "
            "memory, about 30% slower. Always on for FLUX (its blocks update tensors in place).")),
        io.Int.Input("save_every", default=0, min=0, max=100000, tooltip=(
            "Also save <file_name>_stepNNNNN every N steps (with a training state to resume from). "
            "0 = only the final file. Saved checkpoints stay if the run is cancelled.")),
        io.String.Input("file_name", default="tlora/concept", tooltip=(
            "Name in ComfyUI's loras folder (sub-folders allowed). An existing file is never "
            "overwritten (a counter is added) unless this run resumes from it.")),
        io.Combo.Input("resume_from", options=[NO_RESUME] + files.resumable_files(), default=NO_RESUME,
                       tooltip=("Continue a run from a saved T-LoRA's training state (adapters, "
                                "optimizer and step count), up to 'steps' in total. Use the same "
                                "variant, rank, target layers and model.")),
        io.Mask.Input("mask", optional=True, tooltip=(
            "Optional subject mask (white = subject): the loss counts only the masked area, so the "
            "background is not learnt (the reference FLUX recipe). Image or latent size.")),
    ]


def _outputs() -> list:
    return [
        io.Model.Output(display_name="model", tooltip="The input MODEL with the trained T-LoRA applied "
                        "exactly as T-LoRA Loader applies the saved file (per-step rank mask)."),
        io.String.Output(display_name="file_name", tooltip="The saved file's name in the loras folder."),
        io.Image.Output(display_name="loss_curve", tooltip="Training loss per step (light) and its "
                        "moving average (dark)."),
    ]


def resolve_config(architecture: str, *, variant: str, rank: int, min_rank: int, schedule_power: float,
                   steps: int, learning_rate: float, batch_size: int, seed: int, target_layers: str,
                   training_dtype: str, gradient_checkpointing: bool, save_every: int) -> TrainConfig:
    """The node's inputs with the family defaults filled in (not yet validated)."""
    if variant not in VARIANT_CHOICES:
        raise ValueError(f"unknown variant {variant!r} (choices: {', '.join(VARIANT_CHOICES)})")
    if training_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown training_dtype {training_dtype!r}")
    defaults = FAMILY_DEFAULTS[architecture]
    variant_id = VARIANT_CHOICES[variant] or defaults["variant"]
    rank = int(rank) or defaults["rank"]
    if min_rank:
        min_rank = int(min_rank)
    else:
        min_rank = resolve_min_rank(rank, 0.5) if 1 <= rank <= inputs.MAX_RANK else 1
    # FLUX blocks update tensors in place: backward only works with checkpointing.
    checkpointing = bool(gradient_checkpointing) or architecture == "flux"
    return TrainConfig(variant=variant_id, rank=rank, min_rank=min_rank, schedule_power=float(schedule_power),
                       steps=int(steps), learning_rate=float(learning_rate), batch_size=int(batch_size),
                       seed=int(seed), scope=target_layers, compute_dtype=training_dtype,
                       gradient_checkpointing=checkpointing, save_every=int(save_every))


def _progress_sender(node_id):
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or node_id is None or not hasattr(instance, "send_progress_text"):
        return None
    return lambda text: instance.send_progress_text(text, node_id)


class TLoRATrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRATrain", display_name="T-LoRA Train", category="T-LoRA",
            description="Personalise SDXL or FLUX from one image with T-LoRA (timestep-dependent "
                        "LoRA): trains in-process on the loaded MODEL, saves the file to the loras "
                        "folder and outputs the MODEL with it applied.",
            inputs=_inputs(), outputs=_outputs(), hidden=[io.Hidden.unique_id], is_output_node=True)

    @classmethod
    def execute(cls, model, latents, positive, variant, rank, min_rank, schedule_power, steps,
                learning_rate, batch_size, seed, target_layers, training_dtype, gradient_checkpointing,
                save_every, file_name, resume_from, mask=None) -> io.NodeOutput:
        architecture = inputs.architecture_of(model.model)
        config = resolve_config(
            architecture, variant=variant, rank=rank, min_rank=min_rank, schedule_power=schedule_power,
            steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
            target_layers=target_layers, training_dtype=training_dtype,
            gradient_checkpointing=gradient_checkpointing, save_every=save_every)
        job = prepare_job(model, latents, positive, mask, config, file_name, resume_from)
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        try:
            out_model, path, losses = run_job(model, job, config, node_id)
        except BaseException as err:
            # Cancel / NaN / OOM: the traceback's frames still hold the step's activations and the
            # adapters; drop them so the memory is really free before the error reaches the UI.
            traceback.clear_frames(err.__traceback__)
            raise
        finally:
            comfy.model_management.soft_empty_cache()
        title = f"T-LoRA {config.variant} r{config.rank} - {path.stem}"
        return io.NodeOutput(out_model, files.display_name(path),
                             report.image_tensor(report.loss_curve(losses, title)))


@dataclass
class TrainJob:
    """Validated inputs of one run: tensors, the output path and the state to resume from."""

    samples: torch.Tensor
    weights: torch.Tensor | None
    positive: list
    architecture: str
    path: Path
    resume: state_io.TrainingState | None
    inventory: dict


def prepare_job(model, latents, positive, mask, config: TrainConfig, file_name: str,
                resume_from: str) -> TrainJob:
    """Every check that can fail, before any GPU work or file is touched."""
    base = model.model
    architecture = inputs.architecture_of(base)
    inputs.check_numbers(config.steps, config.batch_size, config.learning_rate, config.save_every,
                         config.schedule_power)
    samples = inputs.latent_samples(latents, base, architecture)
    inputs.check_conditioning(positive, base, architecture, samples.shape[0])
    targets = find_targets(base.diffusion_model, architecture, config.scope)
    inputs.check_rank(config.variant, config.rank, config.min_rank, targets)
    weights = inputs.loss_weights(mask, samples)
    resume = resume_path = None
    if resume_from and resume_from != NO_RESUME:
        resume_path = files.resolve_resume(resume_from)
        resume = state_io.load_state(state_io.state_path(resume_path))
        state_io.check_compatible(resume, {"architecture": architecture, "variant": config.variant,
                                           "rank": config.rank, "scope": config.scope},
                                  [adapter_key(t) for t in targets], config.steps)
    path = files.output_path(file_name, resume_path)
    return TrainJob(samples, weights, positive, architecture, path, resume,
                    inventory_from_module(base.diffusion_model))


def _save(path, weights, state, config: TrainConfig, job: TrainJob, step: int) -> None:
    extra = {"tlora.training": config.as_json(step=step, images=int(job.samples.shape[0]),
                                              architecture=job.architecture),
             "modelspec.title": path.stem}
    save_tlora(path, weights, extra_metadata=extra, inventory=job.inventory)
    state_io.save_state(state_io.state_path(path), state)


def run_job(model, job: TrainJob, config: TrainConfig, node_id=None):
    """Train, save, and return (MODEL with the saved T-LoRA applied, saved path, losses)."""
    device = model.load_device
    with torch.inference_mode(False):
        data = inputs.prepare_data(model.model, job.architecture, job.samples, job.positive,
                                   job.weights, device)
    bar = comfy.utils.ProgressBar(config.steps, node_id=node_id)
    if job.resume is not None:
        bar.update_absolute(job.resume.step, config.steps)
    send_text = _progress_sender(node_id)

    def on_step(step, total, loss, losses):
        preview = None
        if step % PREVIEW_EVERY == 0 or step == total:
            preview = ("JPEG", report.loss_curve(losses), report.WIDTH)
        bar.update_absolute(step, total, preview)
        if send_text is not None:
            send_text(report.progress_text(step, total, loss, losses))

    def on_save(step, weights, state):
        _save(files.intermediate_path(job.path, step), weights, state, config, job, step)

    result = train(model, data, config, resume=job.resume, on_step=on_step, on_save=on_save)
    _save(job.path, result.weights, result.state, config, job, result.step)
    # The output MODEL is exactly what T-LoRA Loader makes of the saved file.
    saved = read_tlora(model, files.display_name(job.path))
    out = model.clone()
    install(out, saved, 1.0)
    log.info("T-LoRA Train: saved %s after %d steps (final loss %.4f)", job.path, result.step,
             result.losses[-1] if result.losses else float("nan"))
    return out, job.path, result.losses
