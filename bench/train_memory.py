"""Training memory of real-size SDXL and FLUX.1-dev, computed on torch's meta device (no weights).

What is computed exactly, from the real module shapes:
- base weights (params x bytes of the chosen base dtype), and the trainer's adapter memory for the
  recipe's variant and rank on the paper's attention targets (fp32 trainable factors, their
  gradients, AdamW's two moments, and for Ortho variants the frozen init copies plus the per-step
  factors ``[A; A - A0]``, ``[B S - B0 S0 | B0 S0]`` and their gradients, which the trainer builds
  once per step: see ``training/modules.py``);
- the bytes autograd saves for backward in one training forward (1024 x 1024 image, batch 1,
  compute dtype bf16, the training prompt's token count), with and without per-block gradient
  checkpointing, split into activations and attention matrices; and the activations of the
  largest checkpointed block, i.e. what its recomputation adds at the peak of backward.

What stays an estimate (printed as such): GPU attention kernels (flash / memory-efficient SDPA)
save no attention matrix, so those are left out of the totals; the CUDA context and allocator
slack; the transient per-layer weight copies (bf16 casts of an fp8 base, or the copies that make
inference-tensor weights usable by autograd), bounded here by one block's weights.

    python bench/train_memory.py  ->  bench/results/train_memory.json (git-ignored)
"""

from __future__ import annotations

import collections
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

import torch  # noqa: E402

import comfy_runtime  # noqa: E402

GIB = 2 ** 30
CONTEXT_OVERHEAD_GIB = 1.0   # CUDA context + allocator slack: an estimate, not computed
RECIPES = {"sdxl": ("tlora", 64, torch.bfloat16, 77), "flux": ("vanilla", 32, torch.float8_e4m3fn, 512)}
log = logging.getLogger("train_memory")


def _meta_inputs(family: str, tokens: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    with torch.device("meta"):
        if family == "sdxl":
            return (torch.empty(1, 4, 128, 128, dtype=torch.bfloat16), torch.tensor([500.0]),
                    {"context": torch.empty(1, tokens, 2048, dtype=torch.bfloat16),
                     "y": torch.empty(1, 2816, dtype=torch.bfloat16)})
        return (torch.empty(1, 16, 128, 128, dtype=torch.bfloat16), torch.tensor([0.5]),
                {"context": torch.empty(1, tokens, 4096, dtype=torch.bfloat16),
                 "y": torch.empty(1, 768, dtype=torch.bfloat16), "guidance": torch.tensor([1.0])})


def _attach_meta_adapters(dm: torch.nn.Module, targets, rank: int) -> list[torch.nn.Parameter]:
    """Trainable fp32 low-rank terms on the targets, as forward hooks (the trainer's structure)."""
    params, groups = [], collections.defaultdict(list)
    for t in targets:
        down = torch.nn.Parameter(torch.empty(rank, t.in_features, device="meta"))
        up = torch.nn.Parameter(torch.empty(t.rows, rank, device="meta"))
        params += [down, up]
        groups[t.module].append((t, down, up))

    def hook(group):
        def forward_hook(module, args, out):
            x = args[0].float()
            delta = torch.zeros(out.shape, device="meta")
            for t, down, up in group:
                start, stop = t.out_rows or (0, out.shape[-1])
                part = torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
                delta = delta + torch.nn.functional.pad(part, (start, out.shape[-1] - stop))
            return (out.float() + delta).to(out.dtype)
        return forward_hook

    for name, group in groups.items():
        dm.get_submodule(name).register_forward_hook(hook(group))
    return params


def saved_bytes(family: str, checkpointing: bool, rank: int, tokens: int) -> dict:
    """Bytes saved for backward by one forward of the real-size model with adapters (meta device)."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention as attention
    from comfyui_tlora.tlora_core import families
    from comfyui_tlora.training.prepare import _install_checkpointing, _Restorer, checkpoint_blocks
    from comfyui_tlora.training.targets import find_targets

    # PyTorch SDPA (ComfyUI's CPU default, sub-quadratic attention, asks the device for free memory).
    attention.optimized_attention = attention.attention_pytorch
    comfy.ldm.flux.math.optimized_attention = attention.attention_pytorch
    config = comfy_runtime.REAL_SDXL_CONFIG if family == "sdxl" else comfy_runtime.REAL_FLUX_CONFIG
    dm = comfy_runtime.build_model(family, config, device="meta", dtype=torch.bfloat16).diffusion_model
    dm.requires_grad_(False)
    adapter_params = _attach_meta_adapters(dm, find_targets(dm, family), rank)
    weight_ids = {id(p) for p in dm.parameters()} | {id(p) for p in adapter_params}
    block_names = families.get(family).checkpoint_blocks
    blocks = checkpoint_blocks(dm, block_names)
    current = ["outside blocks"]
    for name, m in blocks.items():
        m.register_forward_pre_hook(lambda *_, n=name: current.__setitem__(0, n))
        m.register_forward_hook(lambda *_: current.__setitem__(0, "outside blocks"))
    if checkpointing:
        _install_checkpointing(dm, _Restorer(), block_names)
    totals, per_block = collections.Counter(), collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        size = t.numel() * t.element_size()
        square = t.ndim >= 3 and t.shape[-1] == t.shape[-2] and t.shape[-1] >= 1024
        kind = "weights" if id(t) in weight_ids else "attention_matrices" if square else "activations"
        totals[kind] += size
        if kind == "activations":
            per_block[current[0]] += size
        return t

    x, t, kwargs = _meta_inputs(family, tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dm(x, t, **kwargs)
    largest = max((v, k) for k, v in per_block.items() if k != "outside blocks")
    block_weights = max(sum(p.numel() for p in m.parameters()) for m in blocks.values())
    return {"activations_gib": totals["activations"] / GIB,
            "attention_matrices_gib": totals["attention_matrices"] / GIB,
            "largest_block": largest[1], "largest_block_activations_gib": largest[0] / GIB,
            "largest_block_params": block_weights}


def adapter_bytes(family: str, variant: str, rank: int) -> dict:
    from comfyui_tlora.training.modules import adapter_memory
    from comfyui_tlora.training.targets import find_targets

    config = comfy_runtime.REAL_SDXL_CONFIG if family == "sdxl" else comfy_runtime.REAL_FLUX_CONFIG
    dm = comfy_runtime.build_model(family, config, device="meta").diffusion_model
    targets = find_targets(dm, family)
    # The trainer's own figure (it asks ComfyUI for this much room before training). Ortho's step
    # factors: alive through the step, their gradients gather in backward (counted in full).
    need = adapter_memory(targets, variant, rank)
    return {"base_params": sum(p.numel() for p in dm.parameters()), "targets": len(targets),
            "trainable_params": need["trainable_params"], "adapter_gib": need["state_bytes"] / GIB,
            "step_factors_gib": need["step_factor_bytes"] / GIB}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comfy_runtime.bootstrap()
    logging.getLogger().setLevel(logging.INFO)
    report = {}
    for family, (variant, rank, base_dtype, tokens) in RECIPES.items():
        a = adapter_bytes(family, variant, rank)
        base_gib = a["base_params"] * torch.empty(0, dtype=base_dtype).element_size() / GIB
        # The trainer's per-layer product has 2 x rank columns for the Ortho variants.
        width = 2 * rank if variant in ("tlora", "ortho") else rank
        with_ckpt = saved_bytes(family, True, width, tokens)
        without = saved_bytes(family, False, width, tokens)
        # bf16 copy of the largest block's weights: the per-forward casts alive at once (estimate).
        casts_gib = with_ckpt["largest_block_params"] * 2 / GIB
        # Recomputing one block in backward saves what that block saves without checkpointing.
        recompute_gib = without["largest_block_activations_gib"]
        peak = base_gib + a["adapter_gib"] + a["step_factors_gib"] + with_ckpt["activations_gib"] + \
            recompute_gib + casts_gib + CONTEXT_OVERHEAD_GIB
        with_ckpt.pop("largest_block_activations_gib")   # inside checkpoints nothing is seen
        report[family] = {"recipe": {"variant": variant, "rank": rank, "base_dtype": str(base_dtype),
                                     "compute_dtype": "bf16", "image": 1024, "text_tokens": tokens},
                          "computed": {"base_gib": base_gib, **a, "checkpointing": with_ckpt,
                                       "no_checkpointing": without},
                          "estimated": {"transient_casts_gib": casts_gib,
                                        "context_and_allocator_gib": CONTEXT_OVERHEAD_GIB,
                                        "peak_with_checkpointing_gib": peak}}
        log.info("%s %s r%d, base %s: base %.2f GiB, adapters+grads+AdamW %.2f GiB, per-step factors "
                 "and their gradients %.2f GiB, saved activations "
                 "%.2f GiB with checkpointing (+%.2f GiB largest block recompute) / %.2f GiB without "
                 "(+%.2f GiB attention matrices a math SDPA would keep); estimated peak %.1f GiB",
                 family, variant, rank, base_dtype, base_gib, a["adapter_gib"], a["step_factors_gib"],
                 with_ckpt["activations_gib"], recompute_gib,
                 without["activations_gib"], without["attention_matrices_gib"], peak)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_memory.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
