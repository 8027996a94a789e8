"""T-LoRA Train: single-image T-LoRA fine-tuning in-process, on the MODEL already in the graph.

Thin node: maps its inputs to a training job (:mod:`training.job`: the family's recipe defaults,
every check before any GPU work, training, the atomic save into ComfyUI's ``loras`` folder) and
the job's results to its outputs. The output MODEL is the saved file applied by the Loader's own
read and mechanism.
"""

from __future__ import annotations

import sys
import traceback

import comfy.model_management
from comfy_api.latest import io, ui

from ..tlora_core import families
from ..tlora_core.schedule import AUTO_MIN_RANK, AUTO_MIN_RANK_TEXT
from ..training import inputs, job, lora_folder, optim, report, timesteps, validation
from ..training.loop import COMPUTE_DTYPES
from ..training.targets import SCOPES
from .loader import load_for_model
from .patch import install


def _recipes(what) -> str:
    """``"64 on SDXL, 32 on FLUX"`` for a recipe field (tooltips)."""
    return ", ".join(f"{what(f.recipe)} on {f.label}" for f in families.all_families())


def _variant_name(variant_id: str) -> str:
    return next(name for name, v in job.VARIANT_CHOICES.items() if v == variant_id)


def _inputs() -> list:
    return [
        io.Model.Input("model", tooltip=f"The {families.known_labels('or')} model to personalise, as "
                       "loaded in the graph "
                       "(any dtype; LoRAs applied before this node become part of the base). It is "
                       "not modified: the trained T-LoRA is applied to the output MODEL only."),
        io.Latent.Input("latents", tooltip="The training image(s), VAE-encoded with this model's VAE. "
                        "One image is the paper's setting; a batch of 2-3 images also works. Centre-"
                        "cropped 1024x1024 (SDXL) matches the reference recipe."),
        io.Conditioning.Input("positive", tooltip="The training prompt, e.g. 'a photo of sks dog' "
                              "(rare token + class, the reference template). One prompt for all "
                              "images, or one per image in image order."),
        io.Combo.Input("variant", options=list(job.VARIANT_CHOICES), default="auto", tooltip=(
            "T-LoRA = Ortho-LoRA init + timestep rank mask (the paper's method). Vanilla T-LoRA = "
            "mask without the Ortho init; Ortho-LoRA = Ortho init without mask; LoRA = plain LoRA "
            "(the paper's baselines). auto = the family's recipe: "
            f"{_recipes(lambda r: _variant_name(r.variant))}. "
            + " ".join(f.recipe.why for f in families.all_families()))),
        io.Int.Input("rank", default=0, min=0, max=inputs.MAX_RANK, tooltip=(
            f"Adapter rank r. 0 = the family's recipe: {_recipes(lambda r: r.rank)}. Higher keeps "
            "more detail but memorises pose and background sooner.")),
        io.Int.Input("min_rank", default=AUTO_MIN_RANK, min=AUTO_MIN_RANK, max=inputs.MAX_RANK, tooltip=(
            "Ranks still active at the noisiest timestep (r_min). "
            f"{AUTO_MIN_RANK_TEXT.split(':')[0]}: half the rank (rounded up), the paper's "
            "recommendation (a quarter loses fidelity). "
            f"({job.LEGACY_AUTO_MIN_RANK}, as older workflows saved it, means the same.) Ignored "
            "by Ortho-LoRA and LoRA.")),
        io.Float.Input("schedule_power", default=1.0, min=0.05, max=10.0, step=0.05, tooltip=(
            "Exponent of the rank schedule r(t) = (r - r_min) * ((T - t) / T)^power + r_min. 1 = the "
            "paper's linear schedule; > 1 masks more ranks at mid timesteps.")),
        io.Int.Input("steps", default=800, min=1, max=100000, tooltip=(
            "Optimizer steps. The paper trains T-LoRA and Ortho-LoRA 800 steps, LoRA and Vanilla "
            "T-LoRA 500 (SDXL, batch 1).")),
        io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6, round=1e-7, tooltip=(
            "AdamW learning rate (betas 0.9/0.999, weight decay 1e-4), 1e-4 the paper's setting for "
            "SDXL and a usual FLUX LoRA rate. With optimizer Prodigy it only scales Prodigy's own "
            "step-size estimate: set 1.0 (the reference FLUX script's value).")),
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
            "memory, about 30% slower. Always on for "
            + " and ".join(f.label for f in families.all_families() if f.recipe.needs_checkpointing)
            + " (its blocks update tensors in place).")),
        io.Int.Input("save_every", default=0, min=0, max=100000, tooltip=(
            "Also save <file_name>_stepNNNNN every N steps (with a training state to resume from). "
            "0 = only the final file. Saved checkpoints stay if the run is cancelled.")),
        io.String.Input("file_name", default="tlora/concept", tooltip=(
            "Name in ComfyUI's loras folder (sub-folders allowed). An existing file is never "
            "overwritten (a counter is added) unless this run resumes from it.")),
        io.Combo.Input("resume_from", options=[job.NO_RESUME] + lora_folder.resumable_files(),
                       default=job.NO_RESUME,
                       tooltip=("Continue a run from a saved T-LoRA's training state (adapters, "
                                "optimizer and step count), up to 'steps' in total. Use the same "
                                "variant, rank, target layers and model.")),
        io.Mask.Input("mask", optional=True, tooltip=(
            "Optional subject mask (white = subject): the loss counts only the masked area, so the "
            "background is not learnt (the reference FLUX recipe). Image or latent size.")),
        *_optimizer_inputs(),
        *_validation_inputs(),
        io.Float.Input("max_vram_gb", default=0.0, min=0.0, max=1024.0, step=0.5, optional=True, tooltip=(
            "Most GPU memory the training steps may use, weights and training together, in GiB. 0 = "
            "automatic: ComfyUI keeps as many weights on the GPU as fit beside the run's working set "
            "and streams the rest from system RAM in every step (so a model bigger than the GPU "
            "trains, slower). Set it to leave room for other programs, or to stream more. Validation "
            "samples load the model as ComfyUI's sampler always does. The log says what is resident "
            "and what streams; a run whose working set alone does not fit is refused before it "
            "starts. The trained T-LoRA is the same either way, unless a LoRA applied before this "
            "node is merged into a 16-bit or smaller base (ComfyUI rounds resident merged weights, "
            "not streamed ones).")),
    ]


def _flow_labels() -> str:
    return ", ".join(f.label for f in families.all_families() if f.timestep == "flow")


def _discrete_labels() -> str:
    return " and ".join(f.label for f in families.all_families() if f.timestep != "flow")


def _optimizer_inputs() -> list:
    """Optimizer, learning-rate schedule and timestep sampling (training.optim, training.timesteps)."""
    return [
        io.Combo.Input("optimizer", options=list(optim.OPTIMIZERS), default="AdamW", optional=True, tooltip=(
            "AdamW = the paper's setting (SDXL): you choose the learning rate. Prodigy = the reference "
            "FLUX script's optimizer: it estimates the step size itself (set learning_rate 1.0), "
            "useful when you do not want to tune the rate; the reference's settings (betas "
            "0.9/0.999, decoupled weight decay 1e-4, bias correction, safeguard warm-up). Needs the "
            "prodigyopt package; keeps two more adapter-sized buffers. A resume needs the same choice.")),
        io.Combo.Input("lr_schedule", options=list(optim.LR_SCHEDULES), default="constant", optional=True,
                       tooltip=(
            "constant = the paper and both reference scripts. cosine = decays the rate to near zero "
            "by the last step, which settles the adapter at the end of a long run (Prodigy's "
            "authors recommend it). A cosine run resumes only to the same total steps.")),
        io.Int.Input("warmup_steps", default=0, min=0, max=100000, optional=True, tooltip=(
            "Linear learning-rate warm-up over the first N steps (either schedule); 0 = none, as the "
            "paper. A step count, not a fraction, so that a resumed run keeps the same warm-up. "
            "5-10% of the steps helps Prodigy and high rates start stably.")),
        io.Combo.Input("timestep_sampling", options=list(timesteps.TIMESTEP_SAMPLINGS), default="uniform",
                       optional=True, tooltip=(
            f"How training draws noise levels on flow models ({_flow_labels()}). uniform = the "
            "reference code. logit-normal = SD3's density: more steps at mid noise, where flow "
            "models learn composition and identity (see logit_mean / logit_std). 'shifted' maps "
            "either through the shift of the MODEL's sampling as it reaches this node (its family's "
            "default, or what a ModelSamplingFlux / ModelSamplingAuraFlow / ModelSamplingSD3 node "
            "before it sets), so training visits the noise levels its sampler does (more high noise). "
            f"{_discrete_labels()} train on their 1000 discrete timesteps drawn uniformly (the "
            "paper) and accept only uniform.")),
        io.Float.Input("logit_mean", default=0.0, min=-3.0, max=3.0, step=0.05, optional=True, tooltip=(
            "Mean of the logit-normal samplings (0 = centred at sigma 0.5, SD3's setting; > 0 more "
            "noise). Used only by the logit-normal choices.")),
        io.Float.Input("logit_std", default=1.0, min=0.05, max=3.0, step=0.05, optional=True, tooltip=(
            "Spread of the logit-normal samplings (1 = SD3's setting; larger approaches uniform "
            "with more weight at the ends). Used only by the logit-normal choices.")),
    ]


def _validation_inputs() -> list:
    """Validation samples during the run (:mod:`training.validation`); every one optional."""
    return [
        io.Int.Input("validation_every", default=0, min=0, max=100000, optional=True, tooltip=(
            "Sample a validation image every N steps and after the last step, with the T-LoRA as "
            "trained so far (applied as T-LoRA Loader applies it). 0 = off. Each image is shown in "
            "the node's preview as it arrives, saved as <file_name>_stepNNNNN.png beside the "
            "checkpoints, and collected in the validation output. Sampling does not change the "
            "training result.")),
        io.Conditioning.Input("validation_positive", optional=True, tooltip=(
            "The prompt to sample with, e.g. 'a photo of sks dog on the beach' (a new context "
            "shows whether the concept generalises). Needed when validation_every > 0.")),
        io.Conditioning.Input("validation_negative", optional=True, tooltip=(
            "Negative prompt for the validation samples. Not connected = none: the samples run "
            "at CFG 1 whatever validation_cfg says (the same image as CFG with the positive as "
            "negative, at half the cost).")),
        io.Vae.Input("validation_vae", optional=True, tooltip=(
            "The model's VAE, to decode the validation samples into real images. Not connected = "
            "ComfyUI's fast latent-to-RGB preview colours (at latent size: 1/8 of the pixels, 1/16 "
            "for FLUX.2; approximate), which cost nothing but show only composition and colour.")),
        io.Int.Input("validation_steps", default=20, min=1, max=1000, optional=True, tooltip=(
            "Sampler steps per validation image (as KSampler's steps). Each validation image costs "
            "about this many model calls (twice with CFG > 1).")),
        io.Float.Input("validation_cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       optional=True, tooltip=(
                           "CFG of the validation samples (as KSampler's cfg). About 5-7 for SDXL; "
                           "1.0 for FLUX (guidance-distilled), which also halves the cost.")),
        io.Int.Input("validation_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, optional=True,
                     tooltip=("Noise seed of the validation samples: the same for every step, so "
                              "the images differ only by what the T-LoRA has learnt. Independent "
                              "of the training seed.")),
        io.Int.Input("validation_width", default=0, min=0, max=16384, step=8, optional=True, tooltip=(
            "Width of the validation images in pixels. 0 = the training image's size. Rounded down "
            "to the VAE's scale (8; 16 for FLUX.2).")),
        io.Int.Input("validation_height", default=0, min=0, max=16384, step=8, optional=True, tooltip=(
            "Height of the validation images in pixels. 0 = the training image's size. Rounded down "
            "to the VAE's scale (8; 16 for FLUX.2).")),
        io.Combo.Input("validation_sampler", options=list(validation.SAMPLERS), default="euler",
                       optional=True, tooltip="ComfyUI sampler of the validation samples (as KSampler's)."),
        io.Combo.Input("validation_scheduler", options=list(validation.SCHEDULERS), default="normal",
                       optional=True, tooltip="ComfyUI scheduler of the validation samples (as KSampler's)."),
    ]


def _outputs() -> list:
    return [
        io.Model.Output(display_name="model", tooltip="The input MODEL with the trained T-LoRA applied "
                        "exactly as T-LoRA Loader applies the saved file (per-step rank mask)."),
        io.String.Output(display_name="file_name", tooltip="The saved file's name in the loras folder."),
        io.Image.Output(display_name="loss_curve", tooltip="Training loss per step (light) and its "
                        "moving average (dark)."),
        io.Image.Output(display_name="validation", tooltip="Every validation image of the run in one "
                        "grid, in step order, each labelled with its step (a placeholder when "
                        "validation_every is 0)."),
    ]


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
            description=f"Personalise {families.known_labels('or')} from one image with T-LoRA "
                        "(timestep-dependent "
                        "LoRA): trains in-process on the loaded MODEL, saves the file to the loras "
                        "folder and outputs the MODEL with it applied.",
            inputs=_inputs(), outputs=_outputs(), hidden=[io.Hidden.unique_id], is_output_node=True)

    @classmethod
    def execute(cls, model, latents, positive, variant, rank, min_rank, schedule_power, steps,
                learning_rate, batch_size, seed, target_layers, training_dtype, gradient_checkpointing,
                save_every, file_name, resume_from, max_vram_gb=0.0, mask=None, optimizer="AdamW", lr_schedule="constant",
                warmup_steps=0, timestep_sampling="uniform", logit_mean=0.0, logit_std=1.0, validation_every=0,
                validation_positive=None, validation_negative=None, validation_vae=None,
                validation_steps=20, validation_cfg=5.0, validation_seed=0, validation_width=0,
                validation_height=0, validation_sampler="euler",
                validation_scheduler="normal") -> io.NodeOutput:
        config = job.resolve_config(
            inputs.family_of(model.model), variant=variant, rank=rank, min_rank=min_rank,
            schedule_power=schedule_power, steps=steps, learning_rate=learning_rate,
            batch_size=batch_size, seed=seed, target_layers=target_layers,
            training_dtype=training_dtype, gradient_checkpointing=gradient_checkpointing,
            save_every=save_every, optimizer=optimizer, lr_schedule=lr_schedule,
            warmup_steps=warmup_steps, timestep_sampling=timestep_sampling, logit_mean=logit_mean,
            logit_std=logit_std, max_vram_gb=max_vram_gb)
        settings = validation.ValidationSettings(
            every=int(validation_every or 0), positive=validation_positive, negative=validation_negative,
            steps=int(validation_steps), cfg=float(validation_cfg), seed=int(validation_seed),
            width=int(validation_width), height=int(validation_height), sampler=validation_sampler,
            scheduler=validation_scheduler, vae=validation_vae)
        prepared = job.prepare_job(model, latents, positive, mask, config, file_name, resume_from)
        validation.check(settings, model, prepared.family, prepared.samples)
        validator = validation.Validator(
            settings, prepared.path, validation.latent_shape(settings, prepared.family, prepared.samples.shape),
            install) if settings.on else None
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        try:
            out_model, path, losses = job.run_job(model, prepared, config, _reload, node_id=node_id,
                                                  send_text=_progress_sender(node_id), validator=validator)
        except BaseException as err:
            # Cancel / NaN / OOM: the traceback's frames still hold the step's activations and the
            # adapters; drop them so the memory is really free before the error reaches the UI.
            traceback.clear_frames(err.__traceback__)
            raise
        finally:
            comfy.model_management.soft_empty_cache()
        title = f"T-LoRA {config.variant} r{config.rank} - {path.stem}"
        grid = validator.grid() if validator is not None else validation.placeholder()
        return io.NodeOutput(out_model, lora_folder.display_name(path),
                             report.image_tensor(report.loss_curve(losses, title)), grid,
                             ui=ui.PreviewImage(grid, cls=cls) if validator is not None else None)


def _reload(model, lora_name: str):
    """What T-LoRA Loader makes of the saved file: read for this model, applied to a clone."""
    out = model.clone()
    install(out, load_for_model(model, lora_name), 1.0)
    return out
