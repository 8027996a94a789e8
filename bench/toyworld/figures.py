"""The experiment's pictures, drawn with PIL (no plotting library): the sample grid and the
fidelity / text-alignment trade-off plot."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {"LoRA": (214, 39, 40), "Vanilla T-LoRA": (255, 127, 14), "Ortho-LoRA": (44, 160, 44),
           "T-LoRA": (31, 119, 180), "base": (120, 120, 120)}
TILE = 80
GAP = 6


def tile(image: np.ndarray, size: int = TILE) -> Image.Image:
    picture = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    return picture.resize((size, size), Image.NEAREST)


def grid(rows: list[tuple[str, list[np.ndarray]]], prompts: list[str], training_image: np.ndarray,
         training_prompt: str) -> Image.Image:
    """Rows of samples (label, one image per prompt) with the training image at the left."""
    font = ImageFont.load_default()
    label_w, head_h, train_w = 150, 40, TILE + 2 * GAP + 20
    cols = len(prompts)
    width = label_w + train_w + cols * (TILE + GAP) + GAP
    height = head_h + len(rows) * (TILE + GAP) + GAP + 20
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x0 = label_w + train_w
    for c, prompt in enumerate(prompts):
        words = prompt.replace("a sks object ", "").replace(" background", " bg")
        draw.text((x0 + c * (TILE + GAP), 6), words[:16], fill="black", font=font)
        draw.text((x0 + c * (TILE + GAP), 20), words[16:32], fill="black", font=font)
    canvas.paste(tile(training_image), (label_w + GAP, head_h))
    draw.text((label_w + GAP, head_h + TILE + 4), "training image", fill="black", font=font)
    draw.text((label_w + GAP, head_h + TILE + 18), training_prompt.replace("a sks object ", "")[:18],
              fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        y = head_h + r * (TILE + GAP)
        draw.text((6, y + TILE // 2 - 6), label, fill="black", font=font)
        for c, image in enumerate(images):
            canvas.paste(tile(image), (x0 + c * (TILE + GAP), y))
    return canvas


def tradeoff_plot(curves: dict[str, list[tuple[float, float, int]]], title: str) -> Image.Image:
    """Text alignment (y) against concept fidelity (x), one polyline per curve over training
    steps; ``curves`` maps a label (``"<variant> / <inference>"``) to (fidelity, alignment, step)."""
    font = ImageFont.load_default()
    w, h, m = 640, 480, 60
    canvas = Image.new("RGB", (w + 200, h), "white")
    draw = ImageDraw.Draw(canvas)

    def xy(fid: float, ali: float) -> tuple[float, float]:
        return m + fid * (w - 2 * m), h - m - ali * (h - 2 * m)

    draw.rectangle([m, m, w - m, h - m], outline="black")
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, _ = xy(v, 0)
        _, y = xy(0, v)
        draw.line([x, h - m, x, h - m + 4], fill="black")
        draw.text((x - 8, h - m + 8), f"{v:.2f}", fill="black", font=font)
        draw.line([m - 4, y, m, y], fill="black")
        draw.text((m - 34, y - 6), f"{v:.2f}", fill="black", font=font)
    draw.text((w // 2 - 90, h - 24), "concept fidelity (fraction recognised)", fill="black", font=font)
    draw.text((6, 24), "text alignment (background and position right)", fill="black", font=font)
    draw.text((m, 6), title, fill="black", font=font)
    for i, (label, points) in enumerate(curves.items()):
        variant, _, inference = label.partition(" / ")
        colour = COLOURS.get(variant, (0, 0, 0))
        coords = [xy(f, a) for f, a, _ in points]
        if len(coords) > 1:
            if inference == "merged":
                for a, b in zip(coords, coords[1:]):  # dashed: merged at full rank
                    for t in np.linspace(0, 1, 12)[::2]:
                        p = (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)
                        q = (a[0] + (b[0] - a[0]) * (t + 1 / 11), a[1] + (b[1] - a[1]) * (t + 1 / 11))
                        draw.line([p, q], fill=colour, width=2)
            else:
                draw.line(coords, fill=colour, width=2)
        for x, y in coords:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        if coords:
            draw.text((coords[-1][0] + 5, coords[-1][1] - 5), str(points[-1][2]), fill=colour, font=font)
        ly = m + 16 * i
        draw.line([w + 10, ly + 6, w + 30, ly + 6], fill=colour, width=2 if inference != "merged" else 1)
        draw.text((w + 36, ly), label, fill=colour, font=font)
    draw.text((w + 10, m + 16 * len(curves) + 10), "points: checkpoints", fill="black", font=font)
    draw.text((w + 10, m + 16 * len(curves) + 24), "(label = last step)", fill="black", font=font)
    return canvas
