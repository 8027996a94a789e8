"""Test helpers: foreign LoRA files written from known tensors, and model inventories by name.

Each writer reproduces the key layout and dtypes of the tool that makes such files:

- T-LoRA reference code, SDXL: diffusers ``save_attn_procs`` of its processors, i.e. safetensors
  with metadata ``{"format": "pt"}`` only, fp32, keys ``<processor>.<proj>_lora.<param>``.
- T-LoRA reference code, FLUX: ``torch.save`` of ``AttnProcsLayers(...).state_dict()``, a plain
  dict of fp32 tensors (saved from CUDA there; from the CPU here). Every processor holds all seven
  ``*_lora`` layers, the single blocks' unused four with their init (down ~ N(0, 1/r), up = 0).
- LyCORIS ``tlora``: ``lycoris_<diffusers name with _>.{q_layer.weight, p_layer.weight,
  lambda_layer (1, r), alpha (0-dim)}``; the frozen base factors are not saved.
- Plain LoRA: kohya (``lora_unet_<path with _>``), LyCORIS LoCon (``lycoris_<name with _>``),
  ComfyUI (``diffusion_model.<path>``), peft (``unet.`` / ``transformer.`` + diffusers name,
  ``lora_A`` / ``lora_B``, no alpha).

Inventories (``{path: (out, in)}`` of the Linear layers ComfyUI builds) are generated from the
architecture here, and cross-checked once against ComfyUI's meta-device models (test_keys.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

REFERENCE_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out",
                  "add_q_proj": "to_q_proj", "add_k_proj": "to_k_proj", "add_v_proj": "to_v_proj"}


@dataclass
class Ortho:
    """Reference Ortho layer: A = q_layer (r, in), B = p_layer (out, r), S = lambda (r,), + init."""

    A: torch.Tensor
    B: torch.Tensor
    S: torch.Tensor
    A0: torch.Tensor
    B0: torch.Tensor
    S0: torch.Tensor


@dataclass
class Vanilla:
    down: torch.Tensor   # (r, in)
    up: torch.Tensor     # (out, r)


@dataclass
class Lycoris:
    q: torch.Tensor      # (r, in)
    p: torch.Tensor      # (out, r)
    lam: torch.Tensor    # (r,)
    alpha: float


def _frame(n: int, r: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return q.float()


def random_ortho(out: int, inp: int, r: int, gen: torch.Generator, drift: float = 0.05) -> Ortho:
    """A 'trained' Ortho layer: orthonormal init frames, then every factor moved by ``drift``."""
    A0, B0 = _frame(inp, r, gen).T.contiguous(), _frame(out, r, gen)
    S0 = torch.rand(r, generator=gen) * 0.1 + 0.01

    def moved(t: torch.Tensor) -> torch.Tensor:
        return t + drift * torch.randn(t.shape, generator=gen)

    return Ortho(moved(A0), moved(B0), moved(S0), A0, B0, S0)


def random_vanilla(out: int, inp: int, r: int, gen: torch.Generator) -> Vanilla:
    return Vanilla(torch.randn(r, inp, generator=gen) / r, 0.1 * torch.randn(out, r, generator=gen))


def trained_lycoris(weight: torch.Tensor, r: int, alpha: float, gen: torch.Generator,
                    drift: float = 0.05) -> Lycoris:
    """LyCORIS's default init (top-r SVD of the fp32 weight), then moved by ``drift``."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return Lycoris(vh[:r] + drift * torch.randn(r, weight.shape[1], generator=gen),
                   u[:, :r] + drift * torch.randn(weight.shape[0], r, generator=gen),
                   s[:r] * (1 + drift * torch.randn(r, generator=gen)), alpha)


def reference_sdxl_state_dict(layers: Mapping[str, Ortho | Vanilla]) -> dict[str, torch.Tensor]:
    """Keys of the reference SDXL file; ``layers`` keyed by diffusers module name (``...attn1.to_q``)."""
    sd = {}
    for name, f in layers.items():
        attn, proj = name.rsplit(".to_", 1)
        prefix = f"{attn}.processor.to_{proj.removesuffix('.0')}_lora."
        if isinstance(f, Ortho):
            sd.update({prefix + "q_layer.weight": f.A, prefix + "p_layer.weight": f.B,
                       prefix + "lambda_layer": f.S.reshape(1, -1), prefix + "base_p.weight": f.B0,
                       prefix + "base_q.weight": f.A0, prefix + "base_lambda": f.S0.reshape(1, -1)})
        else:
            sd.update({prefix + "down.weight": f.down, prefix + "up.weight": f.up})
    return {k: v.float().contiguous() for k, v in sd.items()}


def write_reference_sdxl(path: Path, layers: Mapping[str, Ortho | Vanilla]) -> Path:
    save_file(reference_sdxl_state_dict(layers), str(path), metadata={"format": "pt"})
    return path


def reference_flux_state_dict(layers: Mapping[str, Vanilla], hidden: int, rank: int,
                              gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Keys of the reference FLUX ``lora.pt``; ``layers`` keyed by diffusers module name
    (``transformer_blocks.0.attn.add_q_proj``). With ``gen``, every processor of a block in
    ``layers`` also gets its remaining ``*_lora`` layers at their init, as the reference saves."""
    sd = {}
    blocks = {name.split(".attn.")[0] for name in layers}
    for block in sorted(blocks):
        for proj, ref in REFERENCE_PROJ.items():
            name, prefix = f"{block}.attn.{proj}", f"{block}.attn.processor.{ref}_lora."
            if name in layers:
                f = layers[name]
            elif gen is not None:
                f = Vanilla(torch.randn(rank, hidden, generator=gen) / rank, torch.zeros(hidden, rank))
            else:
                continue
            sd.update({prefix + "down.weight": f.down.float().contiguous(),
                       prefix + "up.weight": f.up.float().contiguous()})
    return sd


def write_reference_flux_pt(path: Path, sd: Mapping[str, torch.Tensor]) -> Path:
    torch.save(dict(sd), str(path))
    return path


def lycoris_state_dict(layers: Mapping[str, Lycoris], dtype: torch.dtype = torch.float32
                       ) -> dict[str, torch.Tensor]:
    sd = {}
    for name, f in layers.items():
        prefix = "lycoris_" + name.replace(".", "_") + "."
        sd.update({prefix + "q_layer.weight": f.q, prefix + "p_layer.weight": f.p,
                   prefix + "lambda_layer": f.lam.reshape(1, -1),
                   prefix + "alpha": torch.tensor(float(f.alpha))})
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def write_safetensors(path: Path, sd: Mapping[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> Path:
    save_file(dict(sd), str(path), metadata=metadata)
    return path


def plain_lora_state_dict(layers: Mapping[str, tuple[torch.Tensor, torch.Tensor, float | None]],
                          style: str) -> dict[str, torch.Tensor]:
    """``layers``: name -> (down, up, alpha). ``style``: "kohya" (name = model path or diffusers
    name, flattened), "lycoris" (LoCon: diffusers name, flattened), "comfy" (model path),
    "peft-unet" / "peft-transformer" (diffusers name)."""
    sd = {}
    for name, (down, up, alpha) in layers.items():
        if style in ("kohya", "lycoris"):
            base = ("lora_unet_" if style == "kohya" else "lycoris_") + name.replace(".", "_")
            d, u = ".lora_down.weight", ".lora_up.weight"
        elif style == "comfy":
            base, d, u = "diffusion_model." + name, ".lora_down.weight", ".lora_up.weight"
        else:
            base, d, u = style.removeprefix("peft-") + "." + name, ".lora_A.weight", ".lora_B.weight"
        sd[base + d], sd[base + u] = down, up
        if alpha is not None:
            sd[base + ".alpha"] = torch.tensor(float(alpha))
    return sd


def _levels(config: Mapping[str, Any]) -> list[int]:
    return [config["model_channels"] * m for m in config["channel_mult"]]


def _transformer_linears(prefix: str, depth: int, h: int, ctx: int) -> dict[str, tuple[int, int]]:
    inv = {f"{prefix}.proj_in": (h, h), f"{prefix}.proj_out": (h, h)}
    for t in range(depth):
        b = f"{prefix}.transformer_blocks.{t}"
        for attn, kv_in in (("attn1", h), ("attn2", ctx)):
            inv.update({f"{b}.{attn}.to_q": (h, h), f"{b}.{attn}.to_k": (h, kv_in),
                        f"{b}.{attn}.to_v": (h, kv_in), f"{b}.{attn}.to_out.0": (h, h)})
        inv.update({f"{b}.ff.net.0.proj": (8 * h, h), f"{b}.ff.net.2": (h, 4 * h)})
    return inv


def sdxl_inventory(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """The Linear layers ComfyUI's UNetModel has for an SDXL-style unet config."""
    mc, ctx, widths = config["model_channels"], config["context_dim"], _levels(config)
    ted, nrb = 4 * mc, config["num_res_blocks"]
    inv = {"time_embed.0": (ted, mc), "time_embed.2": (ted, ted),
           "label_emb.0.0": (ted, config["adm_in_channels"]), "label_emb.0.2": (ted, ted)}
    depth_in, depth_out = list(config["transformer_depth"]), list(config["transformer_depth_output"])
    n = 1
    for level, h in enumerate(widths):
        for _ in range(nrb[level]):
            inv[f"input_blocks.{n}.0.emb_layers.1"] = (h, ted)
            if (d := depth_in.pop(0)) > 0:
                inv.update(_transformer_linears(f"input_blocks.{n}.1", d, h, ctx))
            n += 1
        n += 1   # downsample (none after the last level: the next index is never used)
    h = widths[-1]
    inv.update({"middle_block.0.emb_layers.1": (h, ted), "middle_block.2.emb_layers.1": (h, ted)})
    inv.update(_transformer_linears("middle_block.1", config["transformer_depth_middle"], h, ctx))
    n = 0
    for level in reversed(range(len(widths))):
        for _ in range(nrb[level] + 1):
            inv[f"output_blocks.{n}.0.emb_layers.1"] = (widths[level], ted)
            if (d := depth_out.pop()) > 0:
                inv.update(_transformer_linears(f"output_blocks.{n}.1", d, widths[level], ctx))
            n += 1
    return inv


def sdxl_attention_layers(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Diffusers names and (out, in) of every attention Linear the reference code adapts."""
    widths, nrb, ctx = _levels(config), config["num_res_blocks"], config["context_dim"]
    depth_in, depth_out = list(config["transformer_depth"]), list(config["transformer_depth_output"])
    blocks: list[tuple[str, int, int]] = []
    for level, h in enumerate(widths):
        blocks += [(f"down_blocks.{level}.attentions.{i}", depth_in.pop(0), h) for i in range(nrb[level])]
    blocks.append(("mid_block.attentions.0", config["transformer_depth_middle"], widths[-1]))
    for x, level in enumerate(reversed(range(len(widths)))):
        blocks += [(f"up_blocks.{x}.attentions.{i}", depth_out.pop(), widths[level])
                   for i in range(nrb[level] + 1)]
    layers = {}
    for prefix, depth, h in blocks:
        for t in range(depth):
            for attn, kv_in in (("attn1", h), ("attn2", ctx)):
                b = f"{prefix}.transformer_blocks.{t}.{attn}"
                layers.update({f"{b}.to_q": (h, h), f"{b}.to_k": (h, kv_in), f"{b}.to_v": (h, kv_in),
                               f"{b}.to_out.0": (h, h)})
    return layers


def flux_inventory(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """The Linear layers ComfyUI's Flux model has for a FLUX unet config."""
    h, mlp = config["hidden_size"], int(config["hidden_size"] * config["mlp_ratio"])
    patch = config["patch_size"] ** 2
    inv = {"img_in": (h, config["in_channels"] * patch), "time_in.in_layer": (h, 256),
           "time_in.out_layer": (h, h), "vector_in.in_layer": (h, config["vec_in_dim"]),
           "vector_in.out_layer": (h, h), "txt_in": (h, config["context_in_dim"]),
           "final_layer.linear": (config["out_channels"] * patch, h),
           "final_layer.adaLN_modulation.1": (2 * h, h)}
    if config["guidance_embed"]:
        inv.update({"guidance_in.in_layer": (h, 256), "guidance_in.out_layer": (h, h)})
    for i in range(config["depth"]):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            inv.update({f"{b}_mod.lin": (6 * h, h), f"{b}_attn.qkv": (3 * h, h),
                        f"{b}_attn.proj": (h, h), f"{b}_mlp.0": (mlp, h), f"{b}_mlp.2": (h, mlp)})
    for i in range(config["depth_single_blocks"]):
        b = f"single_blocks.{i}"
        inv.update({f"{b}.linear1": (3 * h + mlp, h), f"{b}.linear2": (h, h + mlp),
                    f"{b}.modulation.lin": (3 * h, h)})
    return inv


def flux_attention_layers(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Diffusers names of every Linear the reference FLUX code trains (all hidden x hidden)."""
    h, layers = config["hidden_size"], {}
    for i in range(config["depth"]):
        layers.update({f"transformer_blocks.{i}.attn.{p}": (h, h) for p in REFERENCE_PROJ})
    for i in range(config["depth_single_blocks"]):
        layers.update({f"single_transformer_blocks.{i}.attn.{p}": (h, h)
                       for p in ("to_q", "to_k", "to_v")})
    return layers
