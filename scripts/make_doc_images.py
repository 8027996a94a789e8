#!/usr/bin/env python
"""Refresh the pictures the README and the template browser show.

Run after the browser test (``scripts/test.sh tests/test_browser.py``), which leaves screenshots in
tests/artifacts/browser/:

- ``workflows/<name>.png``: each workflow's thumbnail (the UI screenshot without the side bars,
  768 px wide), the same-name picture ComfyUI's template browser shows;
- ``docs/images/``: two whole-workflow screenshots, the close-ups of the pack's nodes, and the
  rank schedule plots drawn by the T-LoRA Schedule Preview node itself (SDXL and FLUX noise
  schedules; the schedule depends only on the model family's sampling settings, so ComfyUI's
  tiny test models give the real curves).
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

SHOTS = REPO / "tests" / "artifacts" / "browser"
DOCS = REPO / "docs" / "images"
WORKFLOWS = REPO / "workflows"
# The part of a 1920 x 1200 screenshot below the tab and menu bars and right of the side bar.
GRAPH_BOX = (60, 115, 1920, 1200)
THUMB_WIDTH, DOC_WIDTH = 768, 1280
DOC_WORKFLOWS = ("tlora_sdxl_train_and_generate", "tlora_sdxl_lora_vs_tlora")
log = logging.getLogger("make_doc_images")


def _save_scaled(source: Path, target: Path, width: int, box: tuple | None = None) -> None:
    with Image.open(source) as image:
        image = image.convert("RGB")
        if box:
            image = image.crop(box)
        height = round(image.height * width / image.width)
        image = image.resize((width, height), Image.Resampling.LANCZOS)
        # A UI screenshot has few colours: a 256-colour palette keeps the repository small.
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    log.info("wrote %s", target.relative_to(REPO))


def screenshots() -> None:
    for workflow in sorted(WORKFLOWS.glob("*.json")):
        shot = SHOTS / f"{workflow.stem}.png"
        if not shot.is_file():
            raise SystemExit(f"{shot} is missing: run the browser test first")
        _save_scaled(shot, workflow.with_suffix(".png"), THUMB_WIDTH, GRAPH_BOX)
        if workflow.stem in DOC_WORKFLOWS:
            _save_scaled(shot, DOCS / f"{workflow.stem}.png", DOC_WIDTH, GRAPH_BOX)
    for closeup in sorted(SHOTS.glob("node_*.png")):
        shutil.copyfile(closeup, DOCS / closeup.name)
        log.info("wrote %s", (DOCS / closeup.name).relative_to(REPO))


def schedule_plots() -> None:
    import comfy_runtime

    comfy_runtime.init_nodes()
    import nodes

    preview = nodes.NODE_CLASS_MAPPINGS["TLoRASchedulePreview"]
    settings = {"sdxl": dict(steps=25, scheduler="normal", rank=64, min_rank=32),
                "flux": dict(steps=28, scheduler="simple", rank=32, min_rank=16)}
    for family, values in settings.items():
        model = comfy_runtime.build_model(family, seed=0)
        out = preview.execute(model=model, denoise=1.0, lora_name="", schedule_power=1.0, **values)
        pixels = (out.result[0][0].clamp(0, 1) * 255).round().byte().numpy()
        target = DOCS / f"schedule_{family}.png"
        Image.fromarray(pixels).save(target, optimize=True)
        log.info("wrote %s", target.relative_to(REPO))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    DOCS.mkdir(parents=True, exist_ok=True)
    screenshots()
    schedule_plots()
    return 0


if __name__ == "__main__":
    sys.exit(main())
