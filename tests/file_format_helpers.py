"""Test support for the T-LoRA file: small inventories, random adapters of every variant, deltas.

Functions take the core package as ``core`` so that tests inside the ComfyUI runtime can pass the
pack's own modules (``pack.tlora_core``) and pure-core tests the top-level ``tlora_core``.
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

H = 16          # FLUX-like hidden width
SDXL_INV = {
    **{f"input_blocks.4.1.transformer_blocks.0.attn1.{p}": (32, 32)
       for p in ("to_q", "to_k", "to_v", "to_out.0")},
    "input_blocks.4.1.transformer_blocks.0.attn2.to_q": (32, 32),
    "input_blocks.4.1.transformer_blocks.0.attn2.to_k": (32, 24),
    "input_blocks.4.1.transformer_blocks.0.attn2.to_v": (32, 24),
    "input_blocks.4.1.transformer_blocks.0.attn2.to_out.0": (32, 32),
    "input_blocks.4.1.transformer_blocks.0.ff.net.2": (32, 128),
    "label_emb.0.0": (32, 40),
}
FLUX_INV = {
    "double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.0.img_attn.proj": (H, H),
    "double_blocks.0.txt_attn.qkv": (3 * H, H), "double_blocks.0.txt_attn.proj": (H, H),
    "single_blocks.0.linear1": (3 * H + 4 * H, H), "single_blocks.0.linear2": (H, H + 4 * H),
    "img_in": (H, 64),
}
INVENTORIES = {"sdxl": SDXL_INV, "flux": FLUX_INV}
VARIANT_PARTS = {"tlora": 2, "ortho": 2, "vanilla": 1, "lora": 1}
SCHEDULED = ("tlora", "vanilla")


def make_adapter(core, variant: str, out: int, inp: int, rank: int, min_rank: int, *,
                 gen: torch.Generator, out_rows=None, power: float = 1.0):
    """A random 'trained' adapter: Ortho variants get [B S | -B0 S0], [A; A0] with A != A0 etc."""
    parts = VARIANT_PARTS[variant]
    schedule = core.adapter.RankSchedule(rank, min_rank, power) if variant in SCHEDULED else None
    if parts == 2:
        A0, B0 = torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen)
        S0 = torch.rand(rank, generator=gen) + 0.1
        A, B = A0 + 0.3 * torch.randn(rank, inp, generator=gen), B0 + 0.3 * torch.randn(out, rank, generator=gen)
        S = S0 * 1.5
        down, up = torch.cat([A, A0]), torch.cat([B * S, -B0 * S0], 1)
    else:
        down, up = torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen)
    return core.adapter.LowRankAdapter(down=down, up=up, rank_index=torch.arange(rank).repeat(parts),
                                       schedule=schedule, parts=parts, out_rows=out_rows)


def fused_rows(module: str, out: int) -> list:
    """FLUX fused layers get one adapter per projection (q, k, v); other layers one adapter."""
    if module.endswith("qkv") or module.endswith("linear1"):
        return [(i * H, (i + 1) * H) for i in range(3)]
    return [None]


def make_weights(core, variant: str, architecture: str, rank: int = 4, min_rank: int = 2,
                 power: float = 1.0, seed: int = 0, modules=None):
    inventory = INVENTORIES[architecture]
    gen = torch.Generator().manual_seed(seed)
    adapters = {}
    for module in modules or inventory:
        out, inp = inventory[module]
        adapters[module] = [
            make_adapter(core, variant, out if rows is None else rows[1] - rows[0], inp, rank,
                         min_rank, gen=gen, out_rows=rows, power=power)
            for rows in fused_rows(module, out)]
    schedule = core.adapter.RankSchedule(rank, min_rank, power) if variant in SCHEDULED else None
    return core.weights.TLoRAWeights(adapters=adapters, architecture=architecture, variant=variant,
                                     schedule=schedule, source_format="tlora")


def module_delta(core, group, x: torch.Tensor, out: int, t: float | None) -> torch.Tensor:
    """Sum of a module's adapter outputs at timestep t (None: every rank) on a zero base output."""
    total = torch.zeros(*x.shape[:-1], out, dtype=torch.float64)
    for a in group:
        mask = None
        if t is not None and a.schedule is not None:
            s = a.schedule
            active = core.schedule.active_rank(torch.tensor([t]), s.rank, s.min_rank, s.power, s.T)
            mask = core.schedule.rank_mask(active, a.rank_index)
        delta = core.adapter.lowrank_delta(x, a.down, a.up, mask, a.parts).double()
        total = core.adapter.add_delta(total, delta, 1.0, a.out_rows)
    return total


def rewrite(path, *, metadata: dict | None = None, tensors: dict | None = None, drop=()) -> None:
    """Edit a safetensors file in place: update metadata / tensors, drop keys."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        sd = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(metadata or {})
    sd.update(tensors or {})
    for key in drop:
        sd.pop(key, None)
        meta.pop(key, None)
    save_file(sd, str(path), metadata={k: v for k, v in meta.items() if v is not None})


def read_raw(path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
