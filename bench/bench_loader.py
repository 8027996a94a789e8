"""Sampling time with the T-LoRA Loader vs a stock-merged LoRA of the same rank vs the base model.

All figures come from this one run, on one ComfyUI SDXL model (ComfyUI's own UNet classes) with
SDXL's layer widths but fewer blocks, so that it runs in minutes on a CPU: model_channels 320,
channel_mult [1, 2, 4] (attention at widths 640 and 1280), context_dim 2048 with 77 tokens,
one res block and one transformer block per level (16 attention Linears per transformer block, as
in SDXL: to_q/k/v/out of attn1 and attn2). Two latent sizes give two token counts per attention
level (24x24 latent: 144 / 36 tokens at widths 640 / 1280; 40x40: 400 / 100).

Conditions, for each rank r in 16 / 32 / 64, on every attention Linear:
- ``base``: the model alone;
- ``stock``: a plain LoRA of rank r through ComfyUI's own LoRA loading (comfy.sd.load_lora_for_models,
  what LoraLoaderModelOnly runs): merged into the weights when the model is loaded, so its sampling
  cost is the base model's;
- ``tlora``: an Ortho T-LoRA of rank r (2r adapter columns: trained and frozen factors) with
  min_rank r/2 (the paper's recommendation), applied by the T-LoRA Loader in every model call.

Each measurement is the sampler loop of one ComfyUI sampling run (euler, normal, 3 steps, cfg 2,
so cond and uncond run as one batch of 2), after a warm-up run that loads and patches the model
(see :class:`Timers`). Times are the process's CPU time with one torch thread; the conditions run
round-robin ``--repeats`` times and each condition's fastest run is used, since other processes on
a shared machine only ever add time (medians and every run are in the JSON too).

Two ratios are reported: ``ratios`` (whole sampling runs) and ``tlora/stock_from_attention_time``
= (stock run + the extra time the T-LoRA adds inside the attention Linears) / stock run. On a
CPU the whole-run ratio moves by several percent between runs for reasons unrelated to the
adapters (convolution speed changes with memory layout), so the second ratio, which measures the
T-LoRA's cost where it is spent, is the one to read. Goal: tlora / stock <= 1.10 at rank 64.
Results: ``bench/results/bench_loader.json`` (git-ignored).

    python bench/bench_loader.py [--ranks 16 32 64] [--sizes 24 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
STEPS = 3
log = logging.getLogger("bench_loader")

BENCH_SDXL_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 1, 1],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def attention_linears(patcher) -> dict[str, tuple[int, int]]:
    import torch

    return {name: tuple(m.weight.shape) for name, m in patcher.model.diffusion_model.named_modules()
            if isinstance(m, torch.nn.Linear) and (".attn1." in name or ".attn2." in name)}


def make_tlora(pack, patcher, rank: int, seed: int = 0):
    """An Ortho T-LoRA (paper Eq. 8) on every attention Linear, trained factors near their init."""
    import torch

    adapter_mod = pack.tlora_core.adapter
    schedule = adapter_mod.RankSchedule(rank, pack.tlora_core.schedule.default_min_rank(rank))
    gen = torch.Generator().manual_seed(seed)
    adapters = {}
    for name, (out_f, in_f) in attention_linears(patcher).items():
        a0 = torch.linalg.qr(torch.randn(in_f, rank, generator=gen))[0].T
        b0 = torch.linalg.qr(torch.randn(out_f, rank, generator=gen))[0]
        s0 = torch.rand(rank, generator=gen) * 0.02
        a, b, s = a0 + 0.01 * torch.randn(a0.shape, generator=gen), b0, s0 * 1.5
        adapters[name] = [adapter_mod.LowRankAdapter(
            torch.cat([a, a0]), torch.cat([b * s, -b0 * s0], dim=1),
            torch.arange(rank).repeat(2), schedule, parts=2)]
    return pack.tlora_core.weights.TLoRAWeights(adapters, "sdxl", "tlora", schedule, "bench")


def stock_lora(patcher, rank: int, seed: int = 0):
    """``patcher`` with a plain LoRA of ``rank`` on every attention Linear, the stock way."""
    import comfy.lora
    import comfy.sd
    import torch

    gen = torch.Generator().manual_seed(seed)
    attention = attention_linears(patcher)
    lora, done = {}, set()
    for key, weight_key in comfy.lora.model_lora_keys_unet(patcher.model, {}).items():
        name = weight_key.removeprefix("diffusion_model.").removesuffix(".weight")
        if key.startswith("lora_unet_") and name in attention and name not in done:
            done.add(name)
            out_f, in_f = attention[name]
            lora[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) * 0.01
            lora[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
            lora[f"{key}.alpha"] = torch.tensor(float(rank))
    if len(lora) != 3 * len(attention):
        raise RuntimeError(f"stock LoRA covers {len(lora) // 3} of {len(attention)} attention layers")
    model, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    return model


def conditioning(seed: int) -> list:
    import torch

    gen = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, 1280, generator=gen), "width": 1024, "height": 1024,
             "crop_w": 0, "crop_h": 0, "target_width": 1024, "target_height": 1024}
    return [[torch.randn(1, 77, 2048, generator=gen), extra]]


class Timers:
    """CPU time of the sampler loop and of the attention Linears inside it, for one patcher.

    The loop is timed in ComfyUI's SAMPLER_SAMPLE wrapper, which runs after the model is loaded
    and patched, so switching between conditions (re-merging a stock LoRA) is not counted. Around
    every attention Linear a prepended pre-hook and an appended hook (registered there, i.e. after
    the T-LoRA Loader's hooks were injected) time the layer including any T-LoRA hook.
    """

    def __init__(self, patcher) -> None:
        import comfy.patcher_extension as ext

        self.patcher, self.loop, self.attention = patcher, 0.0, 0.0
        self._start = 0.0
        patcher.add_wrapper_with_key(ext.WrappersMP.SAMPLER_SAMPLE, "bench_timer", self._timed)

    def _pre(self, module, args) -> None:
        self._start = time.process_time()

    def _post(self, module, args, output) -> None:
        self.attention += time.process_time() - self._start

    def _timed(self, executor, *args, **kwargs):
        dm = self.patcher.model.diffusion_model
        handles = []
        for name in attention_linears(self.patcher):
            module = dm.get_submodule(name)
            handles += [module.register_forward_pre_hook(self._pre, prepend=True),
                        module.register_forward_hook(self._post)]
        self.attention, start = 0.0, time.process_time()
        try:
            return executor(*args, **kwargs)
        finally:
            self.loop = time.process_time() - start
            for handle in handles:
                handle.remove()


def time_sampling(patcher, timers: Timers, size: int) -> tuple[float, float]:
    """(sampler loop, attention Linears) CPU seconds of one sampling run."""
    import comfy.sample
    import torch

    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, 0)
    comfy.sample.sample(patcher, noise, STEPS, 2.0, "euler", "normal", conditioning(1), conditioning(2),
                        latent, seed=0, disable_pbar=True)
    return timers.loop, timers.attention


def ratios(seconds: dict[str, float], ranks: list[int]) -> dict[str, float]:
    out = {f"tlora/stock@{r}": seconds[f"tlora@{r}"] / seconds[f"stock@{r}"] for r in ranks}
    out |= {f"stock/base@{r}": seconds[f"stock@{r}"] / seconds["base"] for r in ranks}
    return out | {f"tlora/base@{r}": seconds[f"tlora@{r}"] / seconds["base"] for r in ranks}


def summarise(loop: dict, attention: dict, ranks: list[int], size: int) -> dict:
    best = {name: min(t) for name, t in loop.items()}
    attn = {name: min(t) for name, t in attention.items()}
    # The T-LoRA's own cost, measured where it is spent (attention Linears incl. hooks), added to
    # the stock run: immune to run-to-run effects elsewhere in the model (e.g. convolution speed).
    added = {r: attn[f"tlora@{r}"] - attn[f"stock@{r}"] for r in ranks}
    return {
        "tokens_per_width": {640: (size // 2) ** 2, 1280: (size // 4) ** 2},
        "ratios": ratios(best, ranks),
        "tlora/stock_from_attention_time": {
            f"@{r}": (best[f"stock@{r}"] + added[r]) / best[f"stock@{r}"] for r in ranks},
        "attention_share_of_stock": {f"@{r}": attn[f"stock@{r}"] / best[f"stock@{r}"] for r in ranks},
        "ratios_of_medians": ratios({n: statistics.median(t) for n, t in loop.items()}, ranks),
        "min_s": best, "attention_min_s": attn, "all_s": loop, "attention_all_s": attention,
    }


def run(ranks: list[int], sizes: list[int], repeats: int) -> dict:
    sys.path[:0] = [str(REPO / "tests")]
    import torch

    import comfy_runtime

    torch.set_num_threads(1)
    base = comfy_runtime.build_model("sdxl", BENCH_SDXL_CONFIG)
    pack = comfy_runtime.import_pack()
    patch = importlib.import_module(f"{comfy_runtime.PACK_NAME}.nodes.patch")
    conditions = {"base": base}
    for rank in ranks:
        conditions[f"stock@{rank}"] = stock_lora(base, rank)
        tlora = base.clone()
        patch.install(tlora, make_tlora(pack, base, rank))
        conditions[f"tlora@{rank}"] = tlora
    timers = {name: Timers(model) for name, model in conditions.items()}
    results: dict = {"sizes": {}}
    for size in sizes:
        loop: dict[str, list[float]] = {name: [] for name in conditions}
        attention: dict[str, list[float]] = {name: [] for name in conditions}
        for name, model in conditions.items():   # warm-up: load, merge / inject
            time_sampling(model, timers[name], size)
        for rep in range(repeats):
            for name, model in conditions.items():
                total, attn = time_sampling(model, timers[name], size)
                loop[name].append(total)
                attention[name].append(attn)
            log.info("latent %d: repeat %d/%d done", size, rep + 1, repeats)
        results["sizes"][str(size)] = summarise(loop, attention, ranks, size)
    results["config"] = {"unet": BENCH_SDXL_CONFIG, "steps": STEPS, "cfg": 2.0, "sampler": "euler",
                         "scheduler": "normal", "min_rank": "rank // 2",
                         "repeats": repeats, "ranks": ranks, "attention_linears":
                         len(attention_linears(base)), "threads": torch.get_num_threads(),
                         "torch": torch.__version__, "python": platform.python_version(),
                         "machine": platform.machine()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--sizes", type=int, nargs="+", default=[24, 40])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    results = run(args.ranks, args.sizes, args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_loader.json"
    out.write_text(json.dumps(results, indent=2))
    for size, entry in results["sizes"].items():
        log.info("latent %s (tokens %s): %s", size, entry["tokens_per_width"],
                 ", ".join(f"{k} {v:.3f}" for k, v in entry["ratios"].items()))
        log.info("latent %s: tlora/stock from the attention Linears' time: %s", size,
                 ", ".join(f"{k} {v:.3f}" for k, v in entry["tlora/stock_from_attention_time"].items()))
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
