"""The T-LoRA training loop on a ComfyUI MODEL (paper Sec. 3, reference-code defaults).

One step: pick ``batch_size`` images, draw a noise level and noise per sample, set each sample's
rank mask from its own timestep, predict in the model's native space (see :mod:`.objective`), take
the (optionally subject-masked) MSE, backprop into the adapters only, clip the gradient norm and
take an optimizer step (AdamW or Prodigy, at the schedule's rate for that step: :mod:`.optim`).
The random draws of step k come from a generator seeded by (seed, k) alone, so a run is
reproducible and a resumed run continues exactly as an uninterrupted one.

Cancel (``comfy.model_management.interrupt_current_processing``) is checked before every step and
inside every ComfyUI layer; a NaN / Inf loss stops the run with an error. Either way the hooks are
removed and the model is restored before the exception leaves :func:`train`.

Validation samples (``on_validate``, :mod:`.validation`) run between steps, with the training hooks
off and the adapter in its saved-file form; they draw nothing from the step generators, so a run
gives the same adapter with and without them. The last one runs after ``on_final`` has had the
finished adapter, so a failure or Cancel during that sample loses nothing of the run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field

import comfy.model_management
import torch

from ..tlora_core.adapter import RankSchedule
from ..tlora_core.masks import RankState
from ..tlora_core.weights import TLoRAWeights
from . import memory, optim
from . import state as state_io
from .inputs import TrainingData, family_of
from .modules import MASKED_VARIANTS, AdapterSet
from .objective import NativePredictor, draw_noise_levels, noisy_input_and_target, weighted_mse
from .prepare import release, trainable_model
from .targets import find_targets

log = logging.getLogger(__name__)

GIB = 2 ** 30
COMPUTE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


@dataclass
class TrainConfig:
    """Every setting of a run; each is written to the file's ``tlora.training`` metadata."""

    variant: str = "tlora"          # tlora | vanilla | ortho | lora (tlora_core.adapter.VARIANTS)
    rank: int = 64
    min_rank: int = 32              # used by the masked variants (tlora, vanilla)
    schedule_power: float = 1.0
    steps: int = 800
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 1
    seed: int = 0
    scope: str = "attention"        # training.targets.SCOPES
    compute_dtype: str = "auto"     # COMPUTE_DTYPES
    gradient_checkpointing: bool = True
    max_grad_norm: float = 1.0      # 0 = no clipping
    ortho_mode: str = "fast"        # tlora_core.init.ortho_init mode
    save_every: int = 0
    optimizer: str = "AdamW"        # training.optim.OPTIMIZERS
    lr_schedule: str = "constant"   # training.optim.LR_SCHEDULES
    warmup_steps: int = 0
    timestep_sampling: str = "uniform"   # training.timesteps.TIMESTEP_SAMPLINGS (flow families)
    logit_mean: float = 0.0         # used by the logit-normal samplings
    logit_std: float = 1.0
    max_vram_gb: float = 0.0        # cap on device memory, weights + working set; 0 = automatic

    def schedule(self) -> RankSchedule | None:
        if self.variant not in MASKED_VARIANTS:
            return None
        return RankSchedule(self.rank, self.min_rank, self.schedule_power)

    def as_json(self, **extra) -> str:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d.pop("max_vram_gb")   # where weights lived, not what was trained: streamed == full load
        if self.variant not in MASKED_VARIANTS:
            d.pop("min_rank")
            d.pop("schedule_power")
        if not self.timestep_sampling.startswith("logit-normal"):
            d.pop("logit_mean")
            d.pop("logit_std")
        d.update(extra)
        d["optimizer_settings"] = optim.settings(self.optimizer, self.learning_rate, self.betas,
                                                 self.weight_decay)
        return json.dumps(d, sort_keys=True)

    def resume_options(self) -> dict:
        """The choices a training state records and a resumed run must repeat (:mod:`.optim`)."""
        return optim.resume_options(self.optimizer, self.lr_schedule, self.warmup_steps, self.steps,
                                    self.timestep_sampling, self.logit_mean, self.logit_std)

    def draws(self) -> dict:
        """What each step's random draws depend on besides the step (:func:`step_generator`,
        :func:`sample_indices`): a state records it (``training.state.draw_differences``)."""
        return {"seed": self.seed, "batch_size": self.batch_size}


@dataclass
class TrainResult:
    weights: TLoRAWeights
    losses: list[float]
    step: int
    state: state_io.TrainingState | None = field(default=None, repr=False)


StepCallback = Callable[[int, int, float, list[float]], None]
"""``on_step(step, total, loss, losses)`` after every optimizer step."""
SaveCallback = Callable[[int, "TLoRAWeights", "state_io.TrainingState"], None]
"""``on_save(step, weights, state)`` every ``save_every`` steps (not at the last step);
``on_final(step, weights, state)`` once after the last step, before its validation sample."""
ValidateCallback = Callable[[int, "TLoRAWeights", object], None]
"""``on_validate(step, weights, patcher)`` every ``validate_every`` steps and after the last one,
with the training hooks off: ``patcher`` is the loaded training clone, to sample a clone of (see
:mod:`training.validation`); the callback must leave it loaded as it found it."""


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of step ``step``: a function of (seed, step) only (see module docstring)."""
    mixed = (int(seed) * 6364136223846793005 + (int(step) + 1) * 1442695040888963407) % (1 << 64)
    return torch.Generator().manual_seed(mixed)


def sample_indices(images: int, batch: int, step: int, seed: int) -> list[int]:
    """Images of step ``step``: consecutive slices of per-epoch shuffles, so every image is seen
    equally often (one image: always image 0, twice in a batch of 2 with different noise)."""
    out = []
    for j in range(batch):
        n = step * batch + j
        epoch, pos = divmod(n, images)
        perm = torch.randperm(images, generator=torch.Generator().manual_seed(int(seed) * 7919 + epoch))
        out.append(int(perm[pos]))
    return out


def _identity(config: TrainConfig, architecture: str) -> dict:
    return {"architecture": architecture, "variant": config.variant, "rank": config.rank,
            "scope": config.scope}


def _capture(step: int, losses: list[float], identity: dict, adapters: AdapterSet, optimizer,
             config: TrainConfig) -> state_io.TrainingState:
    state = state_io.capture(step, losses, identity, adapters, optimizer)
    state.options = config.resume_options()
    state.optimizer_groups = optim.group_state(config.optimizer, optimizer)
    state.draws = config.draws()
    return state


def build_weights(adapters: AdapterSet, config: TrainConfig, architecture: str) -> TLoRAWeights:
    schedule = config.schedule()
    return TLoRAWeights(adapters.export(schedule), architecture, config.variant, schedule, "tlora",
                        metadata={"tlora.training": config.as_json()})


def _optimizer(adapters: AdapterSet, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    return optim.make_optimizer(adapters.parameters(), config.optimizer, config.learning_rate,
                                config.betas, config.weight_decay, device)


@contextmanager
def _holding_loaded_tloras(patcher) -> Iterator[None]:
    """Keep the rank masks of T-LoRAs already on the MODEL (a T-LoRA Loader's output) through the
    step's backward, where gradient checkpointing re-runs their layers after the model call."""
    with ExitStack() as stack:
        for holder in patcher.attachments.values():
            state = getattr(holder, "state", None)
            if isinstance(state, RankState):
                stack.enter_context(state.hold())
        yield


def _train_step(step: int, config: TrainConfig, data: TrainingData, predictor: NativePredictor,
                adapters: AdapterSet, optimizer, device) -> float:
    model = predictor.patcher.model
    ms = model.model_sampling
    gen = step_generator(config.seed, step)
    indices = sample_indices(data.images, config.batch_size, step, config.seed)
    x0, conds, weights = data.batch(indices, device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    sigma, t_schedule = draw_noise_levels(ms, len(indices), gen, config.timestep_sampling,
                                          config.logit_mean, config.logit_std)
    sigma = sigma.to(device)
    x_t, target = noisy_input_and_target(ms, x0, noise, sigma)
    adapters.begin_step(t_schedule.to(device))
    try:
        with _holding_loaded_tloras(predictor.patcher):
            pred = predictor(x_t, sigma, conds)
            loss = weighted_mse(pred, target, weights)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"the loss became {value} at step {step + 1}; nothing was saved from this run. "
                    "Lower the learning rate, train in fp32/bf16 instead of fp16, or check the inputs.")
            loss.backward()
    finally:
        adapters.end_step()
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(adapters.parameters(), config.max_grad_norm)
    optim.set_step_lr(optimizer, config.learning_rate,
                      optim.lr_factor(config.lr_schedule, step, config.steps, config.warmup_steps))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value


def run_working_set(patcher, targets, config: TrainConfig, data: TrainingData,
                    checkpointing: bool) -> memory.WorkingSet:
    """What a run needs on the device beside the resident weights (``LoadPlan.memory_required``),
    before ComfyUI has chosen what streams: every layer counted as streamable (its offload
    buffers are those of the largest layers)."""
    model = patcher.model
    dm = model.diffusion_model
    compute = COMPUTE_DTYPES[config.compute_dtype] or model.manual_cast_dtype or model.get_dtype()
    context = max((v.cond.shape[1] for v in data.conds[0].values()
                   if torch.is_tensor(getattr(v, "cond", None)) and v.cond.ndim == 3), default=1)
    latent = (config.batch_size, *data.latents.shape[1:])
    return memory.working_set(dm, family_of(model), targets, variant=config.variant, rank=config.rank,
                              optimizer_copies=optim.STATE_COPIES[config.optimizer], latent_shape=latent,
                              context_tokens=context, compute_dtype=compute, checkpointing=checkpointing,
                              streamed=memory.streamable(dm))


def train(patcher, data: TrainingData, config: TrainConfig, *, resume: state_io.TrainingState | None = None,
          on_step: StepCallback | None = None, on_save: SaveCallback | None = None,
          on_final: SaveCallback | None = None, on_validate: ValidateCallback | None = None,
          validate_every: int = 0) -> TrainResult:
    """Train a T-LoRA on ``patcher``'s model (never modified) and return the exported weights.

    ``data`` comes from :func:`training.inputs.prepare_data`; ``resume`` from
    :func:`training.state.load_state` (already checked with :func:`state.check_compatible`).
    """
    family = family_of(patcher.model)
    architecture = family.id
    dm = patcher.model.diffusion_model
    checkpointing = config.gradient_checkpointing or family.recipe.needs_checkpointing
    if checkpointing and not config.gradient_checkpointing:
        log.info("T-LoRA Train: gradient checkpointing forced on (%s blocks update in place)",
                 family.label)
    targets = find_targets(dm, family, config.scope)
    need = run_working_set(patcher, targets, config, data, checkpointing)
    fallback = need if checkpointing else run_working_set(patcher, targets, config, data, True)
    log.info("T-LoRA Train: %s", need.describe())
    with torch.inference_mode(False), torch.enable_grad(), trainable_model(
            patcher, gradient_checkpointing=checkpointing, compute_dtype=COMPUTE_DTYPES[config.compute_dtype],
            memory_required=need.total, max_vram_bytes=int(config.max_vram_gb * GIB),
            checkpointed_required=fallback.total) as tp:
        device = tp.load_device
        adapters = AdapterSet(targets, config.variant, config.rank, config.seed, config.ortho_mode).to(device)
        optimizer = _optimizer(adapters, config, device)
        losses: list[float] = []
        start = 0
        if resume is not None:
            state_io.restore(resume, adapters, optimizer)
            optim.restore_group_state(optimizer, resume.optimizer_groups)
            start, losses = resume.step, list(resume.losses)
        predictor = NativePredictor(tp)
        identity = _identity(config, architecture)
        rank_state = RankState(strict=True)
        adapters.attach(tp.model.diffusion_model, rank_state, config.schedule())

        def validate(done: int, weights: TLoRAWeights) -> None:
            adapters.detach()   # the sample runs the saved-file form, not the training hooks
            release(tp)         # ComfyUI's own layers for its sampler; the sample reloads the clone
            try:
                on_validate(done, weights, tp)
            finally:
                adapters.attach(tp.model.diffusion_model, rank_state, config.schedule())

        validating = on_validate is not None and validate_every > 0
        try:
            for step in range(start, config.steps):
                comfy.model_management.throw_exception_if_processing_interrupted()
                loss = _train_step(step, config, data, predictor, adapters, optimizer, device)
                losses.append(loss)
                done = step + 1
                if on_step is not None:
                    on_step(done, config.steps, loss, losses)
                if on_save is not None and config.save_every and done % config.save_every == 0 \
                        and done < config.steps:
                    on_save(done, build_weights(adapters, config, architecture),
                            _capture(done, losses, identity, adapters, optimizer, config))
                if validating and done % validate_every == 0 and done < config.steps:
                    validate(done, build_weights(adapters, config, architecture))
            weights = build_weights(adapters, config, architecture)
            final_state = _capture(config.steps, losses, identity, adapters, optimizer, config)
            if on_final is not None:
                on_final(config.steps, weights, final_state)
            if validating and start < config.steps:
                validate(config.steps, weights)
        finally:
            adapters.detach()
            optimizer.zero_grad(set_to_none=True)
    return TrainResult(weights, losses, config.steps, final_state)
