"""The training state saved next to a T-LoRA file, to resume training where it stopped.

``<name>.safetensors`` (the T-LoRA) gets a sidecar ``<name>.tlora-state``: a safetensors file (never
pickle) holding every adapter tensor (trainable factors and the frozen Ortho init), the
optimizer's per-tensor state (AdamW's moments and step counts, Prodigy's too), and in its metadata
the number of optimizer steps done, the loss history, the adapter keys, the settings that define
the adapters (``tlora_state.identity``), the optimizer / schedule / timestep-sampling choices a
resume must repeat (``tlora_state.options``, :func:`training.optim.resume_options`; a state
without it was written by AdamW, constant-rate, uniform-timestep runs) and the optimizer's
per-group running values (``tlora_state.optimizer_groups``: Prodigy's step-size estimate). The
learning rate's schedule is a function of the step count (:func:`training.optim.lr_factor`). The
extension keeps it out of ComfyUI's LoRA lists. The random draws of step k depend only on (seed, k) (see
:func:`training.loop.step_generator`), so the step count is the whole RNG state: a resumed run with
the same seed draws exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..tlora_core.files.atomic import atomic_write
from .optim import DEFAULT_OPTIONS

STATE_SUFFIX = ".tlora-state"
STATE_VERSION = "1"
# Settings that define the adapters' shapes and meaning: a resume must use the same ones.
IDENTITY_FIELDS = ("architecture", "variant", "rank", "scope")


def state_path(lora_path: str | os.PathLike) -> Path:
    return Path(lora_path).with_suffix(STATE_SUFFIX)


@dataclass
class TrainingState:
    step: int
    losses: list[float]
    identity: dict                      # IDENTITY_FIELDS -> value
    adapter_keys: list[str]
    adapter_tensors: dict[str, torch.Tensor]   # "<adapter key>/<tensor name>"
    optimizer_tensors: dict[str, torch.Tensor]  # "<param index>/<state name>"
    # training.optim.resume_options / training.optim.group_state
    options: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_OPTIONS))
    optimizer_groups: list[dict] = dataclasses.field(default_factory=list)
    # What the step's random draws depend on (seed, batch_size): a resumed run with others
    # continues, but not as the uninterrupted run would (:func:`draw_differences`). {} = unknown.
    draws: dict = dataclasses.field(default_factory=dict)


def capture(step: int, losses: list[float], identity: dict, adapters, optimizer) -> TrainingState:
    """Snapshot of an AdapterSet and its optimizer (CPU copies)."""
    tensors = {}
    for key, adapter in zip(adapters.keys(), adapters.adapters):
        for name, t in adapter.state_dict().items():
            tensors[f"{key}/{name}"] = t.detach().to("cpu").clone()
    opt = {}
    params = list(adapters.parameters())
    state = optimizer.state
    for i, p in enumerate(params):
        for name, t in state.get(p, {}).items():
            opt[f"{i}/{name}"] = torch.as_tensor(t).detach().to("cpu").clone()
    return TrainingState(step, list(losses), dict(identity), adapters.keys(), tensors, opt)


def save_state(path: str | os.PathLike, state: TrainingState) -> Path:
    """Write ``state`` atomically (:func:`tlora_core.files.atomic.atomic_write`)."""
    path = Path(path)
    tensors = {f"adapter/{k}": v.contiguous() for k, v in state.adapter_tensors.items()}
    tensors.update({f"optim/{k}": v.contiguous().reshape(-1) if v.ndim == 0 else v.contiguous()
                    for k, v in state.optimizer_tensors.items()})
    metadata = {"tlora_state.version": STATE_VERSION, "tlora_state.step": str(state.step),
                "tlora_state.losses": json.dumps(state.losses),
                "tlora_state.identity": json.dumps(state.identity, sort_keys=True),
                "tlora_state.adapter_keys": json.dumps(state.adapter_keys),
                "tlora_state.options": json.dumps(state.options, sort_keys=True)}
    if state.optimizer_groups:
        metadata["tlora_state.optimizer_groups"] = json.dumps(state.optimizer_groups)
    if state.draws:
        metadata["tlora_state.draws"] = json.dumps(state.draws, sort_keys=True)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_state(path: str | os.PathLike) -> TrainingState:
    """Read a state file; ValueError with the file's name if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no training state '{path.name}' next to the T-LoRA: it is written only when "
                         "a run saves a file (at the end or every N steps)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("tlora_state.version") != STATE_VERSION:
                raise ValueError(f"version {meta.get('tlora_state.version')!r} is not {STATE_VERSION}")
            adapter, opt = {}, {}
            for key in f.keys():
                kind, _, rest = key.partition("/")
                (adapter if kind == "adapter" else opt)[rest] = f.get_tensor(key)
        options = json.loads(meta.get("tlora_state.options", json.dumps(DEFAULT_OPTIONS)))
        groups = json.loads(meta.get("tlora_state.optimizer_groups", "[]"))
        draws = json.loads(meta.get("tlora_state.draws", "{}"))
        return TrainingState(int(meta["tlora_state.step"]), json.loads(meta["tlora_state.losses"]),
                             json.loads(meta["tlora_state.identity"]),
                             json.loads(meta["tlora_state.adapter_keys"]), adapter, opt, options, groups,
                             draws)
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"'{path.name}' is not a usable T-LoRA training state ({err})") from err


def check_compatible(state: TrainingState, identity: dict, adapter_keys: list[str], steps: int,
                     options: dict | None = None) -> None:
    """ValueError unless ``state`` can continue a run with these settings for ``steps`` in total;
    ``options`` (:func:`training.optim.resume_options`) must equal the state's, None = not checked."""
    for field in IDENTITY_FIELDS:
        if state.identity.get(field) != identity.get(field):
            raise ValueError(f"the training state was made with {field} = {state.identity.get(field)!r}, "
                             f"this run has {identity.get(field)!r}: use the same {field} to resume")
    if state.adapter_keys != adapter_keys:
        raise ValueError("the training state's layers differ from this model's adapted layers "
                         f"({len(state.adapter_keys)} vs {len(adapter_keys)}); resume on the same model")
    # A cosine schedule fixes the run's length: only that length resumes it (_check_options).
    planned = state.options.get("schedule_steps") if state.options.get("lr_schedule") == "cosine" else None
    if planned is not None and state.step >= planned:
        raise ValueError(f"the training state is at step {state.step}, the end of its cosine "
                         "learning-rate schedule (metadata tlora_state.options), which cannot be "
                         "extended: resume from an earlier save_every checkpoint of that run, or "
                         "start a new run")
    if state.step >= steps:
        target = f"to {planned}" if planned is not None else f"above {state.step}"
        raise ValueError(f"the training state is already at step {state.step}; set steps {target} "
                         "to train further")
    if options is not None:
        _check_options(state.options, options)


def _check_options(saved: dict, ours: dict) -> None:
    """The main choices first (their names are the node's inputs), then what they imply."""
    order = ["optimizer", "lr_schedule", "warmup_steps", "timestep_sampling", "logit_mean", "logit_std"]
    for key in order + sorted((set(saved) | set(ours)) - set(order) - {"schedule_steps"}):
        if saved.get(key) != ours.get(key):
            raise ValueError(f"the training state was made with {key} = {saved.get(key)!r} (metadata "
                             f"tlora_state.options), this run has {ours.get(key)!r}: use the same "
                             f"{key} to resume")
    if saved.get("schedule_steps") != ours.get("schedule_steps"):
        raise ValueError(f"the training state's cosine learning-rate schedule runs over "
                         f"{saved.get('schedule_steps')} steps (metadata tlora_state.options: "
                         f"schedule_steps), this run has steps = {ours.get('schedule_steps')}: set steps "
                         f"to {saved.get('schedule_steps')} to resume it (a cosine schedule cannot be "
                         "stretched)")


def draw_differences(state: TrainingState, draws: dict) -> list[str]:
    """What differs between the state's draws and this run's (``{"seed": ..., "batch_size": ...}``),
    one phrase each naming the metadata key; [] when nothing does or the state does not say."""
    return [f"{key} = {draws.get(key)!r} (the state, metadata tlora_state.draws, has {value!r})"
            for key, value in sorted(state.draws.items()) if draws.get(key) != value]


def restore(state: TrainingState, adapters, optimizer) -> None:
    """Load the adapter tensors and the optimizer moments of ``state`` into a fresh run
    (call with inference mode off)."""
    with torch.no_grad():
        for key, adapter in zip(adapters.keys(), adapters.adapters):
            own = adapter.state_dict()
            loaded = {name: state.adapter_tensors[f"{key}/{name}"] for name in own}
            adapter.load_state_dict(loaded)
    sd = optimizer.state_dict()
    per_param: dict[int, dict] = {}
    for key, tensor in state.optimizer_tensors.items():
        index, _, name = key.partition("/")
        # Cloned here (inference mode off): a state read inside a node is made of inference
        # tensors, which the optimizer could not update in place.
        tensor = tensor.clone()
        per_param.setdefault(int(index), {})[name] = tensor.reshape(()) if name == "step" else tensor
    sd["state"] = per_param
    optimizer.load_state_dict(sd)
