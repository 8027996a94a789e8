"""The optimizer and learning-rate schedule of T-LoRA Train, and the choices a resume must keep.

Contract.

- Optimizers (:data:`OPTIMIZERS`): ``AdamW`` (the paper's SDXL setting: betas 0.9/0.999, weight
  decay 1e-4, eps 1e-8; the fused kernel on CPU / CUDA) and ``Prodigy`` (the ``prodigyopt``
  package). The Prodigy settings are the reference FLUX script's defaults: learning rate 1.0 (a
  multiplier of Prodigy's own step-size estimate), betas 0.9/0.999, beta3 None (= sqrt(beta2)),
  weight decay 1e-4 decoupled (AdamW-style), eps 1e-8, bias correction on, safeguard warm-up on;
  Prodigy's d0 / d_coef / growth_rate stay at the package defaults, as there.
- Schedules (:data:`LR_SCHEDULES`): the rate of optimizer step ``s`` (0-based) of ``steps`` is
  ``learning_rate * lr_factor(s)``: a linear warm-up ``(s + 1) / warmup_steps`` for
  ``s < warmup_steps``, then 1 (``constant``, the paper and both reference scripts) or
  ``(1 + cos(pi * (s - warmup_steps) / (steps - warmup_steps))) / 2`` (``cosine``). The factor is
  a function of the step alone, so the step count restores the schedule's position exactly.
- Resume: :func:`resume_options` are the choices a training state records
  (``tlora_state.options``) and a resumed run must repeat; :func:`group_state` /
  :func:`restore_group_state` carry the optimizer's per-group running values (Prodigy's step-size
  estimate ``d`` and its sums, kept in ``param_groups``, not in the per-tensor state).
"""

from __future__ import annotations

import importlib
import math

import torch

OPTIMIZERS = ("AdamW", "Prodigy")
LR_SCHEDULES = ("constant", "cosine")
PRODIGY_MIN_LR = 0.1
"""Below this a Prodigy rate is an AdamW-sized rate by mistake (the reference script warns there)."""
# The reference FLUX script's Prodigy arguments (its defaults; see the module docstring).
PRODIGY_SETTINGS = {"lr": 1.0, "betas": (0.9, 0.999), "beta3": None, "weight_decay": 1e-4, "eps": 1e-8,
                    "decouple": True, "use_bias_correction": True, "safeguard_warmup": True}
ADAMW_EPS = 1e-8
# Per-group running values each optimizer updates in ``param_groups`` (hyperparameters excluded).
GROUP_STATE = {"AdamW": (), "Prodigy": ("d", "d_max", "d_numerator", "d_denom", "d_hat", "k")}
FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")
STATE_COPIES = {"AdamW": 2, "Prodigy": 4}
"""Parameter-sized buffers each optimizer keeps: Adam's two moments; Prodigy's also ``s`` and ``p0``
(``p0`` is a scalar for a factor that starts at zero, so 4 is Prodigy's most)."""
DEFAULT_OPTIONS = {"optimizer": "AdamW", "lr_schedule": "constant", "warmup_steps": 0,
                   "timestep_sampling": "uniform"}
"""The options of a training state written before they were recorded (what those runs used)."""


def _prodigy_class():
    try:
        return importlib.import_module("prodigyopt").Prodigy
    except ImportError as err:
        raise ValueError("optimizer Prodigy needs the Python package 'prodigyopt', which is not installed "
                         "in ComfyUI's Python: install it there (python -m pip install prodigyopt, or "
                         "this pack's requirements.txt) and restart ComfyUI, or choose optimizer "
                         "AdamW") from err


def check_choices(optimizer: str, lr_schedule: str, warmup_steps: int, steps: int,
                  learning_rate: float) -> None:
    """ValueError for an unknown optimizer / schedule, a bad warm-up, a missing ``prodigyopt``, or
    an AdamW-sized Prodigy rate."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r} (choices: {', '.join(OPTIMIZERS)})")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {lr_schedule!r} (choices: {', '.join(LR_SCHEDULES)})")
    if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be 0 (off) or a positive number of steps, got {warmup_steps}")
    if warmup_steps >= steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be below steps ({steps}): the warm-up "
                         "would never reach the full learning rate")
    if optimizer == "Prodigy":
        _prodigy_class()
        if learning_rate < PRODIGY_MIN_LR:
            raise ValueError(f"learning_rate {learning_rate:g} is an AdamW-sized rate; Prodigy estimates "
                             "the step size itself and learning_rate only scales it: use 1.0 (the "
                             f"reference FLUX script's value), or at least {PRODIGY_MIN_LR}")


def make_optimizer(params, optimizer: str, learning_rate: float, betas: tuple[float, float],
                   weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """The run's optimizer over ``params`` (AdamW with the given betas / weight decay, or Prodigy
    with :data:`PRODIGY_SETTINGS` and ``learning_rate`` as its multiplier)."""
    params = list(params)
    if optimizer == "Prodigy":
        settings = {**PRODIGY_SETTINGS, "lr": learning_rate}
        return _prodigy_class()(params, **settings)
    # The fused AdamW kernel updates every adapter tensor in one call per step instead of a
    # dozen small ops per tensor; same update rule. Other devices get the default implementation.
    fused = True if torch.device(device).type in FUSED_OPTIMIZER_DEVICES else None
    return torch.optim.AdamW(params, lr=learning_rate, betas=tuple(betas), weight_decay=weight_decay,
                             eps=ADAMW_EPS, fused=fused)


def settings(optimizer: str, learning_rate: float, betas, weight_decay: float) -> dict:
    """The optimizer's full settings, for the file's ``tlora.training`` metadata."""
    if optimizer == "Prodigy":
        return {**PRODIGY_SETTINGS, "lr": learning_rate, "betas": list(PRODIGY_SETTINGS["betas"])}
    return {"lr": learning_rate, "betas": list(betas), "weight_decay": weight_decay, "eps": ADAMW_EPS}


def lr_factor(lr_schedule: str, step: int, steps: int, warmup_steps: int) -> float:
    """The schedule's factor for optimizer step ``step`` (0-based) of ``steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if lr_schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / (steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_step_lr(optimizer: torch.optim.Optimizer, learning_rate: float, factor: float) -> None:
    """Set every group's rate for the coming step."""
    lr = learning_rate * factor
    for group in optimizer.param_groups:
        group["lr"] = lr


def resume_options(optimizer: str, lr_schedule: str, warmup_steps: int, steps: int,
                   timestep_sampling: str, logit_mean: float, logit_std: float) -> dict:
    """The choices a resumed run must repeat (only those that apply: the logit-normal parameters
    with a logit-normal sampling, the schedule's length with a cosine schedule)."""
    options = {"optimizer": optimizer, "lr_schedule": lr_schedule, "warmup_steps": int(warmup_steps),
               "timestep_sampling": timestep_sampling}
    if timestep_sampling.startswith("logit-normal"):
        options.update(logit_mean=float(logit_mean), logit_std=float(logit_std))
    if lr_schedule == "cosine":
        options["schedule_steps"] = int(steps)
    return options


def group_state(optimizer_name: str, optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each group's running values (JSON numbers; Python floats round-trip exactly)."""
    keys = GROUP_STATE[optimizer_name]
    return [{k: group[k] for k in keys if k in group} for group in optimizer.param_groups]


def restore_group_state(optimizer: torch.optim.Optimizer, saved: list[dict]) -> None:
    if saved and len(saved) != len(optimizer.param_groups):
        raise ValueError(f"the training state has {len(saved)} optimizer groups, this run has "
                         f"{len(optimizer.param_groups)}")
    for group, values in zip(optimizer.param_groups, saved):
        group.update(values)
