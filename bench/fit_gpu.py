"""Does a family's T-LoRA recipe fit a GPU? ComfyUI's partial loading, modelled at real size.

For every family (its recipe: variant, rank, attention layers; 1024 x 1024, batch 1, AdamW, bf16
compute, checkpointing on) with a bf16 and an fp8 base, on NVIDIA cards of 8 / 12 / 16 / 24 / 32 GB
(GiB of memory), this follows what T-LoRA Train does on a GPU and projects what the step then
needs:

1. the working set it asks ComfyUI to leave free: ``training.memory.working_set`` as
   ``training.loop.run_working_set`` calls it, before ComfyUI has chosen what streams (every layer
   counted as streamable: offload buffers for the largest layers);
2. ComfyUI's own loader decides: ``load_models_gpu(memory_required=W, force_full_load=False)``
   keeps ``free - max(minimum_inference_memory, W + extra_reserved_memory)`` bytes of weights,
   and ``ModelPatcher.load`` picks the resident layers (largest first, with its own cast-buffer
   reservation), here run by ComfyUI's own code on the meta device (:func:`comfy_load`);
3. the step's need on top of the resident weights, from ``bench/train_memory.py``'s exact
   meta-device model (not the estimate): with the weight copies backward keeps where layers
   compute on a cast (an fp8 base; when anything streams, counted for every layer: an upper bound
   for the streamed ones' private copies), plus the casts of the streamed layers in flight
   (``training.memory.offload_buffers``, ComfyUI's two offload streams on NVIDIA);
4. fits when resident weights + that + the CUDA context (:data:`CUDA_CONTEXT_GIB`, an estimate)
   stay within the card. Streamed weights cross PCIe twice per step (forward and the backward
   recomputation of their block): projected at :data:`PCIE_GB_S` GB/s, unhidden. They live in
   host RAM (pinned where ComfyUI can).

What is modelled, not measured: no GPU ran this. The CUDA context, the caching allocator's
fragmentation and cuDNN's workspaces are estimates or left out; the transfer time assumes no
overlap with compute (ComfyUI's offload streams overlap part of it).

    python bench/fit_gpu.py [--families sdxl,flux] [--markdown]  ->  bench/results/fit_gpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO), str(REPO / "bench")]

import torch  # noqa: E402
import train_memory  # noqa: E402

import comfy_runtime  # noqa: E402

GIB = 2 ** 30
CARDS_GB = (8, 12, 16, 24, 32)
BASES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
PCIE_GB_S = 25.0             # PCIe 4.0 x16 with pinned memory, in 10^9 bytes per second
CUDA_CONTEXT_GIB = 0.5       # the CUDA context and PyTorch's own before ComfyUI loads: an estimate
NUM_STREAMS = 2              # ComfyUI's offload streams on NVIDIA (comfy.model_management)
IMAGE = 1024
log = logging.getLogger("fit_gpu")


def comfy_load(family: str, base: torch.dtype, weight_budget: float, config: dict | None = None,
               compute_dtype: torch.dtype = train_memory.COMPUTE_DTYPE) -> dict:
    """ComfyUI's own ``ModelPatcher.load`` of the real-size model (weights in ``base``, run in
    ``compute_dtype``) on the meta device with ``lowvram_model_memory=weight_budget`` (and two
    offload streams, as on NVIDIA): the resident bytes it counts, its cast-buffer reservation and
    the layers it left streaming (by name)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    from comfyui_tlora.training.layer_weights import is_comfy_op, streams

    model = train_memory.meta_model(family, config, base, compute_dtype)
    meta = torch.device("meta")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=meta, offload_device=meta)
    with ExitStack() as stack:
        stack.callback(setattr, mm, "NUM_STREAMS", mm.NUM_STREAMS)
        mm.NUM_STREAMS = NUM_STREAMS
        init = getattr(comfy.ops.disable_weight_init, "_zero_init_parameter", None)
        if init is not None:   # it would make real zeros of every meta weight it loads
            stack.callback(setattr, comfy.ops.disable_weight_init, "_zero_init_parameter", init)
            comfy.ops.disable_weight_init._zero_init_parameter = staticmethod(lambda module, name: None)
        size = patcher.model_size()
        patcher.load(meta, lowvram_model_memory=weight_budget, full_load=weight_budget >= size)
    streamed = {n: m for n, m in model.diffusion_model.named_modules()
                if is_comfy_op(m) and isinstance(getattr(m, "weight", None), torch.Tensor) and streams(m)}
    return {"model_bytes": size, "resident_bytes": int(model.model_loaded_weight_memory),
            "comfy_buffer_bytes": int(getattr(model, "model_offload_buffer_memory", 0)),
            "streamed": streamed, "streamed_bytes": sum(mm.module_size(m) for m in streamed.values())}


def estimate(family: str, streamed: dict | None = None, config: dict | None = None):
    """``training.memory.working_set`` for the family's recipe run (the trainer's own call)."""
    from comfyui_tlora.tlora_core import families
    from comfyui_tlora.training import memory
    from comfyui_tlora.training.targets import find_targets

    spec = families.get(family)
    variant, rank, _, tokens = train_memory.RECIPES[family]
    dm = train_memory.meta_model(family, config).diffusion_model
    side = IMAGE // spec.latent_downscale
    latent = (1, spec.latent_channels, *(1,) * (spec.latent_ndim - 4), side, side)
    return memory.working_set(dm, spec, find_targets(dm, spec), variant=variant, rank=rank,
                              optimizer_copies=2, latent_shape=latent, context_tokens=tokens,
                              compute_dtype=train_memory.COMPUTE_DTYPE, checkpointing=True,
                              streamed=streamed, num_streams=NUM_STREAMS)


def step_need(family: str, copies: bool, config: dict | None = None) -> dict[str, float]:
    """The exact model's need beside the base weights at each moment of a step, in bytes
    (``train_memory.predict`` without its base and context). ``copies``: every layer keeps a copy
    of its weight for backward (computing on a cast); else none does (zero-copy aliases)."""
    p = train_memory.predict(family, image=IMAGE, checkpointing=True, device="gpu", config=config,
                             base_dtype=train_memory.COMPUTE_DTYPE, copy_every_weight=copies)
    return {k: (v - p["base_gib"]) * GIB for k, v in p["moments_gib"].items()}


def fit(family: str, card_gb: int, base: torch.dtype, needs: dict[bool, dict[str, float]], asked: dict,
        config: dict | None = None) -> dict:
    """One card: what T-LoRA Train asks, what ComfyUI keeps, what the step needs, whether it fits.
    ``needs``: :func:`step_need` without and with weight copies; ``asked``: :func:`working_sets`."""
    import comfy.model_management as mm
    from comfyui_tlora.training import memory

    card = card_gb * GIB
    free = card - CUDA_CONTEXT_GIB * GIB
    ws = asked["working_set"]
    budget = max(0.0, free - max(mm.minimum_inference_memory(), ws.total + mm.extra_reserved_memory()))
    load = comfy_load(family, base, budget or 0.1, config)   # ComfyUI's own floor: 0.1 byte
    buffers = memory.offload_buffers(load["streamed"], train_memory.COMPUTE_DTYPE, NUM_STREAMS)
    need = needs[base != train_memory.COMPUTE_DTYPE or bool(load["streamed"])]
    in_flight = ("end_of_forward", "largest_recompute")
    step = max(v + (buffers if k in in_flight else 0) for k, v in need.items())
    peak = load["resident_bytes"] + step + CUDA_CONTEXT_GIB * GIB
    streamed = load["streamed_bytes"]
    return {"card_gb": card_gb, "base": str(base).replace("torch.", ""), "model_gib": load["model_bytes"] / GIB,
            "asked_gib": ws.total / GIB, "asked": ws.describe(), "weight_budget_gib": budget / GIB,
            "resident_gib": load["resident_bytes"] / GIB, "streamed_gib": streamed / GIB,
            "streamed_layers": len(load["streamed"]), "offload_buffers_gib": buffers / GIB,
            "step_need_gib": step / GIB, "peak_gib": peak / GIB, "fits": peak <= card and budget > 0,
            "pcie_bytes_per_step": 2 * streamed, "pcie_s_per_step": 2 * streamed / (PCIE_GB_S * 1e9),
            "host_ram_gib": streamed / GIB}


def working_sets(family: str, base: torch.dtype, config: dict | None = None) -> dict:
    """The model's size in ComfyUI's count and the working set the trainer asks for, with every
    layer streamable (:func:`training.memory.streamable`), as ``training.loop`` asks."""
    import comfy.model_patcher
    from comfyui_tlora.training import memory

    model = train_memory.meta_model(family, config, base, train_memory.COMPUTE_DTYPE)
    size = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("meta"),
                                            offload_device=torch.device("meta")).model_size()
    return {"model_bytes": size, "working_set": estimate(family, memory.streamable(model.diffusion_model), config)}


def family_fits(family: str, config: dict | None = None) -> dict:
    needs = {copies: step_need(family, copies, config) for copies in (False, True)}
    out = {}
    for name, dtype in BASES.items():
        asked = working_sets(family, dtype, config)
        out[name] = [fit(family, gb, dtype, needs, asked, config) for gb in CARDS_GB]
    return out


def cell(r: dict) -> str:
    """A table cell: fits / streams N GiB (projected PCIe seconds per step) / does not fit."""
    if not r["fits"]:
        return "does not fit"
    if not r["streamed_layers"]:
        return f"fits ({r['peak_gib']:.1f})"
    return f"streams {r['streamed_gib']:.1f} ({r['pcie_s_per_step']:.1f} s)"


# What other trainers publish for a family and base (their documentation, 1024 px, batch 1, with
# gradient checkpointing unless said), shown beside the projection. Their settings differ from the
# recipe's (rank, optimizer, cached text encoders): a guide, not a like-for-like comparison.
PEERS = {
    ("sdxl", "bf16"): "sd-scripts: a LoRA in 8 GB",
    ("flux", "bf16"): "SimpleTuner (rank 16): more than 30 GB; int8 18 GB, int4 13 GB, nf4 about 9 GB at 512 px",
    ("flux", "fp8"): ("sd-scripts (docs/flux_train_network.md): 24 GB at batch 2; 16 GB with block swap; "
                      "12 GB with 16 blocks swapped and 8-bit AdamW, 10 GB with 22, 8 GB with 28"),
    ("qwen_image", "bf16"): "musubi-tuner (docs/qwen_image.md): 42 GB",
    ("qwen_image", "fp8"): ("musubi-tuner (docs/qwen_image.md): 30 GB; 24 GB with 16 blocks swapped, "
                            "12 GB with 45; 64 GB of host RAM recommended"),
}


def markdown(results: dict[str, dict]) -> str:
    """The README's "Does it fit my GPU?" table: one row per family and base dtype."""
    from comfyui_tlora.tlora_core import families

    head = ("| Family (recipe) | Base | Weights | " + " | ".join(f"{gb} GB" for gb in CARDS_GB)
            + " | Host RAM for streamed weights | Published by others |")
    rows = [head, "| " + " | ".join(["---"] * (len(CARDS_GB) + 5)) + " |"]
    for family, by_base in results.items():
        spec = families.get(family)
        variant, rank, _, _ = train_memory.RECIPES[family]
        for name, fits in by_base.items():
            ram = max((r["host_ram_gib"] for r in fits if r["fits"]), default=0.0)
            rows.append(f"| {spec.label} ({variant}, rank {rank}) | {name} | {fits[0]['model_gib']:.1f} | "
                        + " | ".join(cell(r) for r in fits)
                        + f" | {f'up to {ram:.1f}' if ram else '-'} | {PEERS.get((family, name), '')} |")
    return "\n".join(rows)


def available(version: str) -> list[str]:
    import family_configs

    return [f for f in train_memory.RECIPES if family_configs.runs_here(f, version)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help="comma-separated ids (default: every family this ComfyUI has)")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    args = parser.parse_args(argv)
    comfy_runtime.bootstrap()
    logging.basicConfig(format="%(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    chosen = args.families.split(",") if args.families else available(comfy_runtime.comfyui_version())
    results = {}
    for family in chosen:
        results[family] = family_fits(family)
        for name, fits in results[family].items():
            log.info("%s %s: %s", family, name, "; ".join(f"{r['card_gb']} GB {cell(r)}" for r in fits))
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fit_gpu.json").write_text(json.dumps(results, indent=2))
    if args.markdown:
        sys.stdout.write(markdown(results) + "\n")
    return results


if __name__ == "__main__":
    main()
