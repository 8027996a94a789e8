"""Run the toy experiment and write what a person looks at and a program checks.

    python -m bench.toyworld.run [--output demo_output/toyworld] [--full]

Writes into the output folder:

- ``grid.png``: rows = variants x inference mode (and the base model), columns = prompts, the
  training image at the left; the last checkpoint of the first seed;
- ``tradeoff.png``: text alignment against concept fidelity over the checkpoints;
- ``results.json`` (settings, base-model quality, every run's scores, the table) and ``results.csv``
  (one row per variant, inference, seed and step); ``table.md`` (the README's table);
- ``samples/<variant>/<inference>/*.png``: every generated image (16x16, as sampled), listed in
  ``samples.json`` = ``{"samples": [...]}``; the base model's in ``base_samples.json``;
- ``loras/``: the trained files (every checkpoint), readable by T-LoRA Loader and stock loaders.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from . import evaluate, experiment, figures, sampling, world
from . import model as toy_model

log = logging.getLogger("toyworld")
REPO = Path(__file__).resolve().parents[2]
QUICK = experiment.Settings()
FULL = experiment.Settings(seeds=(0, 1, 2, 3, 4), save_every=200)


def _slug(text: str) -> str:
    return text.replace(" ", "_").replace(",", "")


def sample_entry(out: Path, record: dict) -> dict:
    """Write one sample's PNG; its samples.json entry."""
    req: sampling.Request = record["request"]
    scene = req.scene
    folder = out / "samples" / _slug(record["variant"]) / record["inference"]
    name = f"seed{record['seed']}_step{record['step']:05d}_{_slug(scene.position)}_{scene.background}_{req.seed}.png"
    return {"path": (folder / name).relative_to(out).as_posix(), "variant": record["variant"],
            "inference": record["inference"], "seed": record["seed"], "step": record["step"],
            "prompt": scene.caption(), "background_rgb": list(world.BACKGROUNDS[scene.background]),
            "position": scene.position, "sample_seed": req.seed, "score": record["score"].as_dict()}


def save_png(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)


def write_outputs(out: Path, settings: experiment.Settings, result: dict, base_images: np.ndarray,
                  base_quality: dict, seconds: float) -> dict:
    reqs = experiment.requests(experiment.EVAL_SCENES, settings.images_per_prompt)
    entries = []
    by_key = {}
    for record in result["samples"]:
        key = (record["variant"], record["inference"], record["seed"], record["step"])
        by_key.setdefault(key, []).append(record)
    for key, records in by_key.items():
        for record, image in zip(records, result["images"][key]):
            entry = sample_entry(out, record)
            save_png(image, out / entry["path"])
            entries.append(entry)
    (out / "samples.json").write_text(json.dumps({"samples": entries}, indent=1))
    base_entries = []
    for req, image in zip(reqs, base_images):
        rel = f"samples/base/{_slug(req.scene.position)}_{req.scene.background}_{req.seed}.png"
        save_png(image, out / rel)
        base_entries.append({"path": rel, "variant": "base", "prompt": req.scene.caption(),
                             "background_rgb": list(world.BACKGROUNDS[req.scene.background]),
                             "position": req.scene.position, "sample_seed": req.seed,
                             "score": evaluate.score(image, req.scene).as_dict()})
    (out / "base_samples.json").write_text(json.dumps({"samples": base_entries}, indent=1))

    final = settings.steps
    rows = experiment.table(result["runs"], final)
    base_scores = [evaluate.score(i, r.scene) for i, r in zip(base_images, reqs)]
    base_summary = {**evaluate.summarise(base_scores),
                    "copies_training_layout": experiment.copies_layout(base_scores),
                    "copies_training_position": experiment.copies_position(base_scores, [r.scene for r in reqs])}
    numbers = {"settings": experiment.settings_dict(settings), "seconds": round(seconds, 1),
               "base_model_quality": base_quality, "base_on_concept_prompts": base_summary,
               "table_final_step": rows,
               "tables_per_step": {s: experiment.table(result["runs"], s) for s in settings.checkpoints()},
               "runs": result["runs"]}
    (out / "results.json").write_text(json.dumps(numbers, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result["runs"][0]))
        writer.writeheader()
        writer.writerows(result["runs"])
    (out / "table.md").write_text(markdown_table(rows, base_summary, settings))

    first = settings.seeds[0]
    grid_reqs = [experiment.EVAL_SCENES.index(s) * settings.images_per_prompt for s in experiment.GRID_SCENES]
    grid_rows = [("base model", [base_images[i] for i in grid_reqs])]
    for variant in experiment.VARIANTS:
        for inference in experiment.INFERENCE:
            images = result["images"][(variant, inference, first, final)]
            grid_rows.append((f"{variant} ({inference})", [images[i] for i in grid_reqs]))
    figures.grid(grid_rows, [s.caption() for s in experiment.GRID_SCENES], world.render(experiment.TRAIN_SCENE),
                 experiment.TRAIN_SCENE.caption()).save(out / "grid.png")
    curves = {}
    for variant in experiment.VARIANTS:
        for inference in experiment.INFERENCE:
            points = []
            for step in settings.checkpoints():
                chosen = [r for r in result["runs"] if r["variant"] == variant
                          and r["inference"] == inference and r["step"] == step]
                points.append((float(np.mean([r["fidelity"] for r in chosen])),
                               float(np.mean([r["alignment"] for r in chosen])), step))
            curves[f"{variant} / {inference}"] = points
    figures.tradeoff_plot(curves, f"toy SDXL, one training image, mean of {len(settings.seeds)} seeds").save(
        out / "tradeoff.png")
    return numbers


def markdown_table(rows: list[dict], base: dict, settings: experiment.Settings) -> str:
    lines = ["| variant | inference | text alignment | fidelity | background right | position right "
             "| copies the training position |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['inference']} | {r['alignment']:.2f} ± {r['alignment_ci95']:.2f} "
                     f"| {r['fidelity']:.2f} ± {r['fidelity_ci95']:.2f} | {r['background']:.2f} "
                     f"| {r['position']:.2f} | {r['copies_training_position']:.2f} |")
    lines.append(f"| base model (no concept) | - | {base['alignment']:.2f} | {base['fidelity']:.2f} "
                 f"| {base['background']:.2f} | {base['position']:.2f} | {base['copies_training_position']:.2f} |")
    lines.append("")
    lines.append(f"Step {settings.steps}, {len(settings.seeds)} training seeds, "
                 f"{len(experiment.EVAL_SCENES)} prompts x {settings.images_per_prompt} images each; "
                 "± = half-width of the 95% t-interval over seeds.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="T-LoRA vs LoRA on the toy world (CPU, real ComfyUI)")
    parser.add_argument("--output", type=Path, default=REPO / "demo_output" / "toyworld")
    parser.add_argument("--full", action="store_true", help="the benchmark: 5 seeds, checkpoints "
                        "every 200 steps (about 3x the time of the default)")
    parser.add_argument("--learning-rate", type=float, help="override the fine-tuning learning rate")
    parser.add_argument("--steps", type=int, help="override the training steps (tests use a few)")
    parser.add_argument("--seeds", type=int, help="override the number of training seeds")
    parser.add_argument("--images-per-prompt", type=int, help="override the images per prompt")
    parser.add_argument("--sampler-steps", type=int, help="override the sampler steps")
    parser.add_argument("--no-base-quality", action="store_true",
                        help="skip measuring the base model on the base world (saves a minute)")
    parser.add_argument("--weights", type=Path, default=toy_model.WEIGHTS, help="the toy base model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = FULL if args.full else QUICK
    if args.learning_rate:
        settings = dataclasses.replace(settings, learning_rate=args.learning_rate)
    if args.steps or args.seeds or args.images_per_prompt or args.sampler_steps:
        steps = args.steps or settings.steps
        settings = dataclasses.replace(
            settings, seeds=tuple(range(args.seeds or len(settings.seeds))), steps=steps,
            save_every=settings.save_every if not args.steps else max(1, steps // 2),
            images_per_prompt=args.images_per_prompt or settings.images_per_prompt,
            sampler_steps=args.sampler_steps or settings.sampler_steps)
    out = args.output.resolve()
    (out / "loras").mkdir(parents=True, exist_ok=True)

    from .runtime import bootstrap

    bootstrap()
    import folder_paths

    folder_paths.folder_names_and_paths["loras"] = ([str(out / "loras")], folder_paths.supported_pt_extensions)
    folder_paths.filename_list_cache.pop("loras", None)
    started = time.perf_counter()
    base = toy_model.load_base(args.weights)
    quality = None if args.no_base_quality else experiment.base_quality(base, log=log.info)
    reqs = experiment.requests(experiment.EVAL_SCENES, settings.images_per_prompt)
    base_images = sampling.generate(base, reqs, settings.sampler_steps, settings.cfg)
    result = experiment.run(base, settings, log=log.info)
    numbers = write_outputs(out, settings, result, base_images, quality, time.perf_counter() - started)
    log.info("\n%s", (out / "table.md").read_text())
    log.info("toy experiment done in %.0f s; results in %s", numbers["seconds"], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
