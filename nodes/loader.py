"""T-LoRA Loader node: apply a T-LoRA with its timestep-dependent rank mask at every sampling step.

The paper's inference rule (Eq. 5 / Eq. 8): at timestep t only the first
``r(t) = int(((T - t) / T) ** power * (rank - min_rank)) + min_rank`` ranks are active, so the
adapter cannot be merged into the weights once (as the stock LoraLoader does); it is applied in
the forward pass with the mask of each call's noise level (see :mod:`.patch`).

The file is read and checked completely, and the model cloned and patched only afterwards, so a
bad file, a file for another architecture or an impossible ``min_rank`` raise a message naming the
file and the fix, and nothing is half-patched.
"""

from __future__ import annotations

import logging

import folder_paths
import torch
from comfy_api.latest import io

from ..tlora_core import families
from ..tlora_core.base_weight import BaseWeights
from ..tlora_core.files.check import TLoRAFileError
from ..tlora_core.files.read import load_tlora_file
from ..tlora_core.inventory import inventory_from_module, linear_modules
from ..tlora_core.schedule import AUTO_MIN_RANK, AUTO_MIN_RANK_TEXT, default_min_rank
from ..tlora_core.weights import TLoRAWeights
from ..training.timesteps import model_rule
from .patch import install

log = logging.getLogger(__name__)

CATEGORY = "T-LoRA"

MIN_RANK_TOOLTIP = (
    "Ranks active at the highest noise level. The active rank grows from min_rank (pure noise) to "
    f"the full rank (clean image) as sampling proceeds (paper Eq. 6). {AUTO_MIN_RANK_TEXT}; files "
    "such as the T-LoRA reference code's store none. The paper recommends half the rank: lower "
    "values (a quarter) lose likeness to the subject, higher ones let the early, high-noise steps "
    "copy the training image's pose and background.")
POWER_TOOLTIP = (
    "Shape of the rank schedule r(t) = int(((1000 - t)/1000)^power * (rank - min_rank)) + min_rank. "
    "0 = the value stored in the file (1.0, the paper's linear schedule, if it stores none). Above 1 "
    "the rank stays low for more steps; below 1 it reaches the full rank sooner.")


def lora_path(lora_name: str) -> str:
    """The full path of a file in ComfyUI's ``loras`` folders, or a clear error."""
    path = folder_paths.get_full_path("loras", lora_name) if lora_name else None
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths("loras")) or "(none configured)"
        raise FileNotFoundError(
            f"T-LoRA file '{lora_name}' was not found in the loras folders ({folders}). Put the file "
            "there (or in a folder listed in extra_model_paths.yaml) and refresh the page.")
    return path


def base_weights(patcher) -> BaseWeights:
    """``{module path: float32 weight}`` of the diffusion model's Linear-like layers, dequantized when
    first read (classic fp8 up-cast, ComfyUI's QuantizedTensor, 0.3.75's scale_weight, GGUF blocks),
    without the patches of other LoRAs: ComfyUI's backup of a weight it merged patches into, and a
    GGUF weight's own value without the patches ComfyUI-GGUF hangs on it. LyCORIS files rebuild their
    frozen factors from these; ``.storage(path)`` says how each layer's weight is stored."""
    layers = {}
    for name, module in linear_modules(patcher.model.diffusion_model).items():
        backup = patcher.backup.get(f"diffusion_model.{name}.weight")
        layers[name] = (module, backup.weight if backup is not None else module.weight)
    return BaseWeights(layers)


def schedule_ranks(weights: TLoRAWeights) -> set[int]:
    return {a.schedule.rank for group in weights.adapters.values() for a in group
            if a.schedule is not None}


def load_for_model(patcher, lora_name: str, min_rank: int = AUTO_MIN_RANK, schedule_power: float = 0.0,
                   rank_refactor: bool = False) -> TLoRAWeights:
    """Read ``lora_name`` for ``patcher``'s model with the node's min_rank / power conventions
    (``AUTO_MIN_RANK`` / 0 = from the file). Raises ValueError / FileNotFoundError with a message
    for the UI: whatever fails while the file is read is a TLoRAFileError naming the file (an
    unexpected exception's traceback goes to the log), never a bare exception of the readers."""
    if min_rank != AUTO_MIN_RANK and min_rank < 1:
        raise ValueError(f"min_rank must be {AUTO_MIN_RANK} (automatic) or a rank >= 1, got {min_rank}")
    if schedule_power < 0:
        raise ValueError(f"schedule_power must be 0 (from the file) or > 0, got {schedule_power}")
    family, _ = model_rule(patcher)
    path = lora_path(lora_name)
    try:
        weights = load_tlora_file(
            path, inventory_from_module(patcher.model.diffusion_model),
            min_rank=None if min_rank == AUTO_MIN_RANK else min_rank,
            power=None if schedule_power == 0 else schedule_power,
            rank_refactor=rank_refactor, base_weights=base_weights(patcher), family=family)
    except TLoRAFileError:
        raise
    except (OSError, ValueError) as err:
        raise TLoRAFileError(f"{lora_name}: {err}") from err
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise                                   # the machine's limit, not the file's fault
    except Exception as err:
        log.error("%s: unexpected error while reading it for the model", lora_name, exc_info=err)
        raise TLoRAFileError(f"{lora_name}: cannot be read for this model ({type(err).__name__}: "
                             f"{err}); the log has the details for a bug report.") from err
    ranks = schedule_ranks(weights)
    if min_rank > 0 and ranks and min_rank > max(ranks):
        raise TLoRAFileError(
            f"{lora_name}: min_rank {min_rank} is larger than the file's rank {max(ranks)}. Set "
            f"min_rank between 1 and {max(ranks)} (the paper recommends {default_min_rank(max(ranks))}), "
            f"or {AUTO_MIN_RANK} to use the file's value.")
    if not ranks and (min_rank > 0 or schedule_power > 0):
        log.info("%s has no rank schedule (an ordinary LoRA): min_rank and schedule_power are "
                 "ignored; enable schedule_ordinary_lora to give it one", lora_name)
    for warning in weights.warnings:
        log.warning("%s", warning)
    return weights


class TLoRALoader(io.ComfyNode):
    """Apply a T-LoRA file to a model, masking its ranks per sampling step and per sample."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRALoader",
            display_name="T-LoRA Loader",
            category=CATEGORY,
            description=(
                "Applies a T-LoRA (timestep-dependent LoRA) to the model. Unlike the stock LoRA "
                "loader, which merges a LoRA once, it applies the adapter in every model call and "
                "uses only the ranks allowed at that call's noise level: few ranks at high noise "
                "(less overfitting to the training image), all ranks near the end (detail). Reads "
                "this pack's files, the T-LoRA reference code's SDXL and FLUX files, LyCORIS "
                "'tlora' files and, optionally, ordinary LoRAs. Chain several to stack T-LoRAs."),
            inputs=[
                io.Model.Input("model", tooltip=(
                    f"The diffusion model ({families.known_labels('or')}) to apply the T-LoRA to. It is "
                    "not changed: "
                    "a patched copy is returned.")),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"), tooltip=(
                    "The T-LoRA file, from ComfyUI's loras folders: a file from T-LoRA Train, the "
                    "reference code's pytorch_lora_weights.safetensors (SDXL) or lora.pt (FLUX), a "
                    "LyCORIS 'tlora' file, or an ordinary LoRA.")),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip=(
                    "Multiplies the T-LoRA's change to the model. 1.0 = as trained (the reference "
                    "code adds the adapter with scale 1); 0 = the unchanged model; negative values "
                    "subtract it.")),
                io.Int.Input("min_rank", default=AUTO_MIN_RANK, min=AUTO_MIN_RANK, max=4096,
                             tooltip=MIN_RANK_TOOLTIP),
                io.Float.Input("schedule_power", default=0.0, min=0.0, max=10.0, step=0.05,
                               tooltip=POWER_TOOLTIP),
                io.Boolean.Input("schedule_ordinary_lora", default=False, tooltip=(
                    "Only for ordinary (non-T-LoRA) LoRA files. On: re-factor the LoRA into "
                    "orthogonal components sorted by importance and apply the rank schedule to "
                    "them, as if it were a T-LoRA. Off: the LoRA is applied at full rank on every "
                    "step, like the stock loader.")),
            ],
            outputs=[
                io.Model.Output(tooltip=(
                    "The model with the T-LoRA applied in every sampling step, each step and each "
                    "sample using the ranks of its own noise level. Connect it to a sampler, or to "
                    "another T-LoRA Loader to stack a second T-LoRA.")),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name: str, strength_model: float, min_rank: int,
                schedule_power: float, schedule_ordinary_lora: bool) -> io.NodeOutput:
        weights = load_for_model(model, lora_name, min_rank, schedule_power, schedule_ordinary_lora)
        patched = model.clone()
        try:
            install(patched, weights, strength_model)
        except ValueError as err:
            raise TLoRAFileError(f"{lora_name}: {err}") from err
        return io.NodeOutput(patched)
