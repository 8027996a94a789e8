"""The toy experiment: LoRA vs T-LoRA on one image of a new concept, measured from the pixels.

One training image, ``sks`` on the right on green, is fine-tuned into the shipped toy base model
with the pack's own T-LoRA Train node (real ComfyUI runtime, CPU) in the four variants of the
paper, each with several seeds, checkpoints every ``save_every`` steps. Every checkpoint is then
sampled on the prompts that put ``sks`` at the other positions and backgrounds, twice: with T-LoRA
Loader (the per-step rank mask) and with ComfyUI's stock LoRA loader (the same file merged at full
rank, what other tools show). ``evaluate`` scores each image; per variant and inference mode the
means over seeds come with a 95% t-interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import evaluate, pixels, sampling, text, world

VARIANTS = ("LoRA", "Vanilla T-LoRA", "Ortho-LoRA", "T-LoRA")
INFERENCE = ("per-step", "merged")
TRAIN_SCENE = world.concept_scene("right", "green")
EVAL_SCENES = [world.concept_scene(p, b) for p in world.POSITIONS for b in world.BACKGROUNDS
               if (p, b) != (TRAIN_SCENE.position, TRAIN_SCENE.background)]
GRID_SCENES = [world.concept_scene(p, b) for p, b in (("left", "blue"), ("top", "black"),
               ("bottom", "gray"), ("left", "green"), ("right", "blue"), ("top", "gray"))]
# Two-sided 95% Student t quantiles by degrees of freedom (a statistical table, not a fit).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass(frozen=True)
class Settings:
    """One experiment's recipe. Rank 8 / min_rank 4 scale the paper's SDXL recipe (r = 64 on
    attention 640-1280 wide, r_min = r / 2) to the toy's 64-wide attention; 800 steps at batch 1
    as the paper trains T-LoRA. At a learning rate of 1e-3 no variant overfits the toy within 800
    steps (all follow every prompt); 3e-3 is the regime the paper studies, where a plain LoRA
    starts to copy the training image (``--learning-rate`` runs either; the README shows both)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 800
    save_every: int = 400
    rank: int = 8
    min_rank: int = 4
    learning_rate: float = 3e-3
    batch_size: int = 1
    images_per_prompt: int = 2
    sampler_steps: int = sampling.STEPS
    cfg: float = sampling.CFG

    def checkpoints(self) -> list[int]:
        return [s for s in range(self.save_every, self.steps + 1, self.save_every)] or [self.steps]


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval) of per-seed values (half-width 0 for one seed)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, 0.0
    sd = float(np.std(values, ddof=1))
    return mean, T95.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))


def requests(scenes: list[world.Scene], per_prompt: int) -> list[sampling.Request]:
    return [sampling.Request(s, 1000 * i + k) for i, s in enumerate(scenes) for k in range(per_prompt)]


def copies_layout(scores: list[evaluate.Score]) -> float:
    """Fraction of images that show the training image's background and position although their
    prompt asks for another one (every evaluation prompt differs in at least one)."""
    return sum(s.background == TRAIN_SCENE.background and s.position == TRAIN_SCENE.position
               for s in scores) / max(1, len(scores))


def copies_position(scores: list[evaluate.Score], prompted: list[world.Scene]) -> float:
    """Among images whose prompt asks for another position than the training image's, the
    fraction that show the object at the training image's position."""
    asked = [s for s, p in zip(scores, prompted) if p.position != TRAIN_SCENE.position]
    return sum(s.position == TRAIN_SCENE.position for s in asked) / max(1, len(asked))


def train_variant(base, variant: str, seed: int, settings: Settings) -> dict[int, str]:
    """Train one variant with T-LoRA Train; ``{step: lora name}`` of its checkpoints."""
    from comfyui_tlora.nodes.train import TLoRATrain

    image = world.render(TRAIN_SCENE)[None]
    name = f"toyworld/{variant.replace(' ', '_')}_seed{seed}"
    with torch.inference_mode():
        out = TLoRATrain.execute(
            model=base, latents=pixels.encode(image), positive=text.conditioning(TRAIN_SCENE.caption()),
            variant=variant, rank=settings.rank, min_rank=settings.min_rank, schedule_power=1.0,
            steps=settings.steps, learning_rate=settings.learning_rate, batch_size=settings.batch_size,
            seed=seed, target_layers="attention", training_dtype="auto", gradient_checkpointing=False,
            save_every=settings.save_every if settings.save_every < settings.steps else 0,
            file_name=name, resume_from="none")
    final = out.result[1]
    stem = final[: -len(".safetensors")]
    return {step: (final if step == settings.steps else f"{stem}_step{step:05d}.safetensors")
            for step in settings.checkpoints()}


def with_lora(base, lora_name: str, inference: str):
    """The base MODEL with ``lora_name`` applied per step (T-LoRA Loader) or merged (stock)."""
    import nodes as comfy_nodes
    from comfyui_tlora.nodes.loader import TLoRALoader

    with torch.inference_mode():
        if inference == "per-step":
            return TLoRALoader.execute(model=base, lora_name=lora_name, strength_model=1.0, min_rank=-1,
                                       schedule_power=0.0, schedule_ordinary_lora=False).result[0]
        return comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(base, lora_name, 1.0)[0]


def run(base, settings: Settings, log=print) -> dict:
    """Train every variant and seed, sample every checkpoint both ways, score every image.

    Returns ``{"runs": [...], "samples": [...], "images": {...}}``: one run record per (variant,
    inference, seed, step) with its scores, one sample record per image, and the images by
    (variant, inference, seed, step) for the figures.
    """
    reqs = requests(EVAL_SCENES, settings.images_per_prompt)
    runs, samples, images = [], [], {}
    for variant in VARIANTS:
        for seed in settings.seeds:
            files = train_variant(base, variant, seed, settings)
            for step, lora_name in files.items():
                for inference in INFERENCE:
                    model = with_lora(base, lora_name, inference)
                    pictures = sampling.generate(model, reqs, settings.sampler_steps, settings.cfg)
                    scores = [evaluate.score(p, r.scene) for p, r in zip(pictures, reqs)]
                    runs.append({"variant": variant, "inference": inference, "seed": seed, "step": step,
                                 "file": lora_name, **evaluate.summarise(scores),
                                 "copies_training_layout": copies_layout(scores),
                                 "copies_training_position": copies_position(
                                     scores, [r.scene for r in reqs])})
                    images[(variant, inference, seed, step)] = pictures
                    samples += [{"variant": variant, "inference": inference, "seed": seed, "step": step,
                                 "request": r, "score": s} for r, s in zip(reqs, scores)]
                    log(f"{variant:15s} {inference:8s} seed {seed} step {step:4d}: alignment "
                        f"{runs[-1]['alignment']:.2f} fidelity {runs[-1]['fidelity']:.2f}")
    return {"runs": runs, "samples": samples, "images": images}


def table(runs: list[dict], step: int) -> list[dict]:
    """Per variant and inference mode at ``step``: mean and 95% interval over seeds."""
    rows = []
    for variant in VARIANTS:
        for inference in INFERENCE:
            chosen = [r for r in runs if r["variant"] == variant and r["inference"] == inference
                      and r["step"] == step]
            if not chosen:
                continue
            row = {"variant": variant, "inference": inference, "step": step, "seeds": len(chosen)}
            for metric in ("alignment", "background", "position", "fidelity", "concept_distance",
                           "copies_training_layout", "copies_training_position"):
                mean, half = interval([r[metric] for r in chosen])
                row[metric], row[f"{metric}_ci95"] = round(mean, 4), round(half, 4)
            rows.append(row)
    return rows


def base_quality(base, per_prompt: int = 2, log=print) -> dict:
    """How well the base model follows base-world captions, on scenes seen and held out in
    pretraining: background, position, object (colour and shape) right, all three right."""
    held_out = set(world.held_out_scenes())
    result = {}
    for label, scenes in (("seen", [s for s in world.all_base_scenes() if s not in held_out]),
                          ("held_out", sorted(held_out, key=lambda s: s.caption()))):
        reqs = requests(scenes, per_prompt)
        scores = []
        for start in range(0, len(reqs), 96):
            chunk = reqs[start:start + 96]
            pictures = sampling.generate(base, chunk)
            scores += [(evaluate.score(p, r.scene), r.scene) for p, r in zip(pictures, chunk)]
        n = len(scores)
        result[label] = {
            "images": n,
            "background": sum(s.background_right for s, _ in scores) / n,
            "position": sum(s.position_right for s, _ in scores) / n,
            "object": sum(s.nearest == f"{sc.colour} {sc.shape}" for s, sc in scores) / n,
            "all_right": sum(s.aligned and s.nearest == f"{sc.colour} {sc.shape}" for s, sc in scores) / n,
        }
        log(f"base model, {label} scenes: {result[label]}")
    return result


def settings_dict(settings: Settings) -> dict:
    return {**asdict(settings), "checkpoints": settings.checkpoints(), "sampler": sampling.SAMPLER,
            "scheduler": sampling.SCHEDULER, "training_scene": TRAIN_SCENE.caption(),
            "eval_prompts": [s.caption() for s in EVAL_SCENES]}


def save_json_ready(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
