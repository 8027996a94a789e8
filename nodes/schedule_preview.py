"""T-LoRA Schedule Preview node: a picture of the active rank at every sampling step.

For the sampler's sigmas (ComfyUI's own scheduler and ``denoise`` handling, as KSampler computes
them) each step's timestep is taken the way the T-LoRA Loader takes it (:mod:`.patch`: the discrete
timestep on SDXL, ``1000 * sigma`` on FLUX) and mapped through the paper's schedule (Eq. 6, with the
reference code's exponent) ``r(t) = int(((T - t) / T) ** power * (rank - min_rank)) + min_rank``.
The plot is drawn with PIL and returned as an IMAGE, so it can be previewed or saved.
"""

from __future__ import annotations

import math

import comfy.samplers
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw, ImageFont

from ..tlora_core import families
from ..tlora_core.adapter import RankSchedule
from ..tlora_core.schedule import AUTO_MIN_RANK, active_rank, default_min_rank, resolve_min_rank
from ..training.timesteps import model_rule, schedule_timesteps
from .loader import CATEGORY, MIN_RANK_TOOLTIP, POWER_TOOLTIP, load_for_model

NO_FILE = "(none: use rank below)"
WIDTH, HEIGHT = 768, 384
MARGIN = {"left": 64, "right": 24, "top": 64, "bottom": 56}


def step_sigmas(model_sampling, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """The sigma at the start of each step, as KSampler computes it (with partial denoise)."""
    if denoise <= 0:
        return torch.zeros(0)
    total = steps if denoise > 0.9999 else int(steps / denoise)
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, total)
    return sigmas[-(steps + 1):][:-1].float()


def ranks_per_step(model_sampling, sigmas: torch.Tensor, schedule: RankSchedule,
                   rule: str | None = None) -> list[int]:
    t = schedule_timesteps(model_sampling, sigmas, schedule.T, rule)
    return active_rank(t, schedule.rank, schedule.min_rank, schedule.power, schedule.T).tolist()


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):   # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_schedule(ranks: list[int], schedule: RankSchedule, title: str) -> Image.Image:
    """A bar chart of ``ranks`` (one bar per step) with the min_rank and rank levels marked."""
    image = Image.new("RGB", (WIDTH, HEIGHT), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(11)
    left, top = MARGIN["left"], MARGIN["top"]
    right, bottom = WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"]
    draw.text((left, 14), title, fill=(20, 20, 20), font=font)

    def y_of(rank: float) -> float:
        return bottom - (bottom - top) * rank / schedule.rank

    for level, colour in ((schedule.rank, (60, 140, 60)), (schedule.min_rank, (200, 90, 40))):
        y = y_of(level)
        for x in range(left, right, 8):   # dashed guide line
            draw.line([(x, y), (min(x + 4, right), y)], fill=colour, width=1)
        draw.text((8, y - 7), str(level), fill=colour, font=small)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(40, 40, 40), width=1)
    n = max(len(ranks), 1)
    slot = (right - left) / n
    label_every = max(1, math.ceil(n / 25))
    for i, rank in enumerate(ranks):
        x0, x1 = left + i * slot + slot * 0.15, left + (i + 1) * slot - slot * 0.15
        draw.rectangle([x0, y_of(rank), max(x1, x0 + 1), bottom], fill=(70, 110, 200))
        if i % label_every == 0 or i == n - 1:
            draw.text(((x0 + x1) / 2 - 6, bottom + 6), str(i + 1), fill=(40, 40, 40), font=small)
            if n <= 40:
                draw.text(((x0 + x1) / 2 - 6, y_of(rank) - 14), str(rank), fill=(40, 40, 40), font=small)
    draw.text(((left + right) / 2 - 20, HEIGHT - 24), "step", fill=(40, 40, 40), font=font)
    draw.text((8, top - 26), "active rank", fill=(40, 40, 40), font=small)
    return image


def preview_schedule(model, lora_name: str, rank: int, min_rank: int,
                     schedule_power: float) -> tuple[RankSchedule, str]:
    """The schedule to plot and a note on where it came from."""
    power = schedule_power if schedule_power > 0 else None
    if lora_name and lora_name != NO_FILE:
        weights = load_for_model(model, lora_name, min_rank, schedule_power)
        schedules = [a.schedule for g in weights.adapters.values() for a in g if a.schedule]
        if weights.schedule is not None or schedules:
            return weights.schedule or max(schedules, key=lambda s: s.rank), lora_name
        rank = max(a.columns for g in weights.adapters.values() for a in g)
        note = f"{lora_name} (ordinary LoRA: masked only with schedule_ordinary_lora)"
    else:
        note = "no file"
    resolved = default_min_rank(rank) if min_rank == AUTO_MIN_RANK else resolve_min_rank(rank, min_rank)
    return RankSchedule(rank, resolved, power or 1.0), note


class TLoRASchedulePreview(io.ComfyNode):
    """Plot the active T-LoRA rank at each step of a sampler schedule."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRASchedulePreview",
            display_name="T-LoRA Schedule Preview",
            category=CATEGORY,
            description=(
                "Draws how many T-LoRA ranks are active at each sampling step for this model, "
                "scheduler and step count, so you can see what min_rank and schedule_power do "
                "before sampling. Uses the same timestep rule as the T-LoRA Loader."),
            inputs=[
                io.Model.Input("model", tooltip=(
                    "The model you will sample with: its noise schedule (SDXL discrete timesteps, "
                    "FLUX shifted flow sigmas) decides which timestep each step has.")),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip=(
                    "Sampling steps, as on the KSampler.")),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                               tooltip="The KSampler's scheduler (how sigmas are spaced over the steps)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "The KSampler's denoise. Below 1 sampling starts at a lower noise level, so "
                    "the first steps already use more ranks.")),
                io.Combo.Input("lora_name", options=[NO_FILE] + folder_paths.get_filename_list("loras"),
                               default=NO_FILE, tooltip=(
                                   "A T-LoRA file to read rank, min_rank and power from. With "
                                   "'(none)', the rank below is used.")),
                io.Int.Input("rank", default=64, min=1, max=4096, tooltip=(
                    "The adapter rank, used when no file is chosen. The reference recipes use "
                    + ", ".join(f"{f.recipe.rank} ({f.label})" for f in families.all_families()) + ".")),
                io.Int.Input("min_rank", default=AUTO_MIN_RANK, min=AUTO_MIN_RANK, max=4096,
                             tooltip=MIN_RANK_TOOLTIP),
                io.Float.Input("schedule_power", default=0.0, min=0.0, max=10.0, step=0.05,
                               tooltip=POWER_TOOLTIP),
            ],
            outputs=[
                io.Image.Output(tooltip=(
                    "A bar chart of the active rank at each step (orange line: min_rank, green "
                    "line: full rank). Preview or save it.")),
            ],
        )

    @classmethod
    def execute(cls, model, steps: int, scheduler: str, denoise: float, lora_name: str, rank: int,
                min_rank: int, schedule_power: float) -> io.NodeOutput:
        schedule, note = preview_schedule(model, lora_name, rank, min_rank, schedule_power)
        model_sampling = model.get_model_object("model_sampling")
        _, rule = model_rule(model)
        ranks = ranks_per_step(model_sampling, step_sigmas(model_sampling, scheduler, steps, denoise),
                               schedule, rule)
        title = (f"{note}: rank {schedule.rank}, min_rank {schedule.min_rank}, power "
                 f"{schedule.power:g}; {scheduler}, {steps} steps, denoise {denoise:g}")
        picture = np.asarray(draw_schedule(ranks, schedule, title), dtype=np.float32) / 255.0
        return io.NodeOutput(torch.from_numpy(picture)[None])
