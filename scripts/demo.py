"""No-GPU demo: train a T-LoRA on one image, save it, load it with the T-LoRA Loader, sample.

Runs the pack's real nodes inside the real ComfyUI runtime (CPU), on tiny SDXL and FLUX models built
from ComfyUI's own classes (no weights can be downloaded here), exactly as ComfyUI calls them
(under ``torch.inference_mode``). Writes to the output folder:

- ``loras/demo_<family>.safetensors``: the trained T-LoRA (loads in T-LoRA Loader and stock loaders);
- ``<family>_loss.png``: the training loss curve from T-LoRA Train;
- ``<family>_schedule.png``: active rank per sampling step (T-LoRA Schedule Preview);
- ``<family>_samples.png``: latents sampled with the base model, the same file merged at full rank
  by ComfyUI's stock LoRA loader, and T-LoRA Loader, for three prompts (rows) and the same seeds;
- ``summary.json``: what was measured: the training loss on fixed (noise level, noise) pairs before
  and after training, and that the trained MODEL equals T-LoRA Loader(saved file) on every sample.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from train_helpers import fixed_pair_loss  # noqa: E402

import comfy_runtime as rt  # noqa: E402

log = logging.getLogger("tlora.demo")
STEPS = {"sdxl": 400, "flux": 200}
RANK = 8
LATENT_SIZE = 16


def training_latent(family: str, size: int = LATENT_SIZE):
    """A synthetic 'photo': a bright disc (the subject) off-centre on a smooth gradient."""
    import torch

    channels = rt.latent_channels(family)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    subject = (((xx - 0.3) ** 2 + (yy + 0.2) ** 2) < 0.12).float()
    weights = torch.linspace(1.0, -1.0, channels).reshape(channels, 1, 1)
    latent = 0.5 * weights * (xx + yy)[None] + 1.5 * subject[None] * weights.flip(0)
    return {"samples": latent[None]}


def latent_picture(latents, scale: int = 4):
    """Latents (B, C, H, W) -> one PIL image row: first three channels as RGB, per-image contrast."""
    import numpy as np
    from PIL import Image

    tiles = []
    for lat in latents:
        rgb = lat[:3].float()
        rgb = (rgb - rgb.amin()) / (rgb.amax() - rgb.amin() + 1e-8)
        tile = Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
        tiles.append(tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST))
    row = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), tiles[0].height), "white")
    x = 0
    for tile in tiles:
        row.paste(tile, (x, 0))
        x += tile.width + 4
    return row


def save_image_tensor(tensor, path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray((tensor[0].clamp(0, 1).numpy() * 255).astype(np.uint8)).save(path)


def demo_family(family: str, out: Path, pack) -> dict:
    import nodes as comfy_nodes
    import torch
    from comfyui_tlora.nodes.loader import TLoRALoader
    from comfyui_tlora.nodes.schedule_preview import TLoRASchedulePreview
    from comfyui_tlora.nodes.train import TLoRATrain

    model = rt.build_model(family, seed=0)
    latent = training_latent(family)
    positive = rt.fake_conditioning(family, seed=1)  # stands in for "a photo of sks dog"
    started = time.perf_counter()
    with torch.inference_mode():
        trained = TLoRATrain.execute(
            model=model, latents=latent, positive=positive, variant="auto", rank=RANK, min_rank=0,
            schedule_power=1.0, steps=STEPS[family], learning_rate=5e-3, batch_size=2, seed=0,
            target_layers="attention", training_dtype="auto", gradient_checkpointing=True,
            save_every=0, file_name=f"demo_{family}", resume_from="none")
    train_seconds = time.perf_counter() - started
    trained_model, file_name, loss_image = trained.result
    save_image_tensor(loss_image, out / f"{family}_loss.png")
    loss_before = fixed_pair_loss(model, latent, positive)
    loss_after = fixed_pair_loss(trained_model, latent, positive)

    with torch.inference_mode():
        loaded = TLoRALoader.execute(model=model, lora_name=file_name, strength_model=1.0, min_rank=-1,
                                     schedule_power=0.0, schedule_ordinary_lora=False).result[0]
        stock = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, file_name, 1.0)[0]
        preview = TLoRASchedulePreview.execute(model=model, steps=20, scheduler="normal", denoise=1.0,
                                               lora_name=file_name, rank=RANK, min_rank=-1,
                                               schedule_power=0.0).result[0]
    save_image_tensor(preview, out / f"{family}_schedule.png")

    rows, checks = [], {}
    for prompt_seed in (1, 2, 3):
        cond = rt.fake_conditioning(family, seed=10 + prompt_seed)
        with torch.inference_mode():
            results = {name: rt.sample(m, family, steps=8, seed=prompt_seed, positive=cond, size=LATENT_SIZE,
                                       negative=rt.fake_conditioning(family, seed=99), cfg=2.0)
                       for name, m in (("base", model), ("stock", stock), ("tlora", loaded),
                                       ("trained", trained_model))}
        checks[prompt_seed] = {
            "trained_node_model_equals_loader": float((results["trained"] - results["tlora"]).abs().max()),
            "tlora_vs_base": float((results["tlora"] - results["base"]).abs().mean()),
            "tlora_vs_stock_full_rank": float((results["tlora"] - results["stock"]).abs().mean()),
        }
        rows.append(latent_picture(torch.cat([results["base"], results["stock"], results["tlora"]])))
    grid = rows[0].copy().resize((rows[0].width, sum(r.height + 4 for r in rows)))
    grid.paste((255, 255, 255), (0, 0, grid.width, grid.height))
    y = 0
    for row in rows:
        grid.paste(row, (0, y))
        y += row.height + 4
    grid.save(out / f"{family}_samples.png")
    latent_picture(latent["samples"], scale=8).save(out / f"{family}_training_latent.png")
    return {"file": file_name, "train_steps": STEPS[family], "train_seconds": round(train_seconds, 1),
            "fixed_pair_loss_before": loss_before, "fixed_pair_loss_after": loss_after,
            "checks_per_prompt": checks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO / "demo_output"), help="folder for the results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.output).resolve()
    (out / "loras").mkdir(parents=True, exist_ok=True)

    rt.bootstrap()
    import folder_paths

    folder_paths.folder_names_and_paths["loras"] = ([str(out / "loras")], folder_paths.supported_pt_extensions)
    rt.init_nodes()
    pack = rt.import_pack()
    summary = {family: demo_family(family, out, pack) for family in ("sdxl", "flux")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for family, result in summary.items():
        worst = max(c["trained_node_model_equals_loader"] for c in result["checks_per_prompt"].values())
        log.info("%s: trained %d steps in %.1fs -> loras/%s; loss on fixed pairs %.4f -> %.4f; "
                 "trained MODEL vs Loader(file) max diff %.2e", family, result["train_steps"],
                 result["train_seconds"], result["file"], result["fixed_pair_loss_before"],
                 result["fixed_pair_loss_after"], worst)
    log.info("demo results in %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
