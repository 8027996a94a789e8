"""What the trainer shows the user: the loss-curve image and the one-line progress text.

The curve plots every step's loss (light) and a moving average (dark), because single-image
diffusion losses are dominated by the random timestep of each step: the average is the trend.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 512, 320, 36


def moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_curve(losses: list[float], title: str = "") -> Image.Image:
    """An RGB image of the loss per step with its moving average (axes labelled with the range)."""
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = MARGIN + 18, 22, WIDTH - 10, HEIGHT - MARGIN
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    draw.text((left, 4), title or "training loss", fill=(0, 0, 0))
    if not losses:
        draw.text((left + 10, (top + bottom) // 2), "no steps yet", fill=(0, 0, 0))
        return img
    low, high = min(losses), max(losses)
    span = (high - low) or max(abs(high), 1e-12)

    def point(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(len(losses) - 1, 1))
        return x, bottom - (bottom - top) * ((v - low) / span)

    raw = [point(i, v) for i, v in enumerate(losses)]
    avg = [point(i, v) for i, v in enumerate(moving_average(losses, max(1, len(losses) // 20)))]
    if len(raw) > 1:
        draw.line(raw, fill=(150, 180, 230), width=1)
        draw.line(avg, fill=(20, 60, 160), width=2)
    else:
        draw.ellipse([raw[0][0] - 2, raw[0][1] - 2, raw[0][0] + 2, raw[0][1] + 2], fill=(20, 60, 160))
    draw.text((4, top - 4), f"{high:.4g}", fill=(0, 0, 0))
    draw.text((4, bottom - 8), f"{low:.4g}", fill=(0, 0, 0))
    draw.text((left, bottom + 6), "step 1", fill=(0, 0, 0))
    draw.text((right - 60, bottom + 6), f"step {len(losses)}", fill=(0, 0, 0))
    return img


def image_tensor(img: Image.Image) -> torch.Tensor:
    """ComfyUI IMAGE: (1, H, W, 3) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def progress_text(step: int, total: int, loss: float, losses: list[float]) -> str:
    recent = losses[-20:]
    return (f"T-LoRA step {step}/{total}  loss {loss:.4f}  "
            f"(mean of last {len(recent)}: {sum(recent) / len(recent):.4f})")
