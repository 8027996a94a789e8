"""Pretrain the toy base model from scratch on the toy world (reproducible from the seed).

Standard epsilon-prediction diffusion training through ComfyUI's own model (``apply_model`` with
SDXL's discrete noise table): uniform timesteps, 10% empty captions so classifier-free guidance
works, AdamW with warm-up and cosine decay, and an exponential moving average of the weights,
which is what is saved (in fp16: 3.8 MB). The held-out scenes (``world.held_out_scenes``) are
never shown, so the evaluation can tell compositional caption-following from memorisation.

    python -m bench.toyworld.pretrain --steps 10000 --out bench/toyworld/base_sdxl_toy.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from . import model as toy_model
from . import pixels, text, world

log = logging.getLogger("toyworld.pretrain")


def training_set() -> tuple[list[world.Scene], torch.Tensor, torch.Tensor, torch.Tensor]:
    held_out = set(world.held_out_scenes())
    scenes = [s for s in world.all_base_scenes() if s not in held_out]
    x0 = pixels.to_model_space(np.stack([world.render(s) for s in scenes]))
    context, pooled = text.encode([s.caption() for s in scenes])
    return scenes, x0, context, pooled


def lr_at(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(steps: int, batch: int, seed: int, lr: float, out: Path, log_every: int = 250,
             save_every: int = 2000) -> dict:
    import safetensors.torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base = toy_model.base_model(seed)
    unet = base.diffusion_model
    unet.requires_grad_(True)  # ComfyUI 0.33's layers are created frozen
    ms = base.model_sampling
    _, x0_all, ctx_all, pooled_all = training_set()
    empty_ctx, empty_pooled = text.encode([""])
    y_all = base.encode_adm(pooled_output=pooled_all, **text.SIZE_CONDS)
    y_empty = base.encode_adm(pooled_output=empty_pooled, **text.SIZE_CONDS)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    history, started = [], time.time()
    running = 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        idx = torch.randint(0, x0_all.shape[0], (batch,), generator=gen)
        x0, ctx, y = x0_all[idx], ctx_all[idx].clone(), y_all[idx].clone()
        drop = torch.rand(batch, generator=gen) < 0.1
        ctx[drop], y[drop] = empty_ctx[0], y_empty[0]
        t = torch.randint(0, 1000, (batch,), generator=gen)
        sigma = ms.sigmas[t]
        noise = torch.randn(x0.shape, generator=gen)
        x_t = x0 + noise * sigma.view(-1, 1, 1, 1)
        denoised = base.apply_model(x_t, sigma, c_crossattn=ctx, y=y)
        eps = (x_t - denoised) / sigma.view(-1, 1, 1, 1)
        loss = torch.nn.functional.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for k, v in unet.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        running += float(loss.detach())
        if (step + 1) % log_every == 0:
            history.append({"step": step + 1, "loss": running / log_every,
                            "seconds": round(time.time() - started, 1)})
            log.info("step %d/%d loss %.4f (%.0f s)", step + 1, steps, running / log_every,
                     time.time() - started)
            running = 0.0
        if (step + 1) % save_every == 0 or step + 1 == steps:
            target = out if step + 1 == steps else out.with_name(f"{out.stem}_step{step + 1}.safetensors")
            tmp = target.with_suffix(".tmp")
            safetensors.torch.save_file({k: v.half().contiguous() for k, v in ema.items()}, str(tmp),
                                        metadata={"toyworld_seed": str(seed), "step": str(step + 1)})
            tmp.replace(target)
    record = {"steps": steps, "batch": batch, "seed": seed, "lr": lr, "history": history,
              "parameters": sum(p.numel() for p in unet.parameters()),
              "seconds": round(time.time() - started, 1), "torch": torch.__version__}
    out.with_suffix(".train.json").write_text(json.dumps(record, indent=1))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10000, help="optimizer steps (shipped: 10000)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (shipped: 32)")
    parser.add_argument("--seed", type=int, default=0, help="seeds init, data order and noise")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--out", type=Path, default=toy_model.WEIGHTS, help="where the EMA weights go "
                        "(and <name>_stepN every 2000 steps, <name>.train.json the log)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from .runtime import bootstrap

    bootstrap()
    torch.set_num_threads(1)
    pretrain(args.steps, args.batch, args.seed, args.lr, args.out)


if __name__ == "__main__":
    main()
