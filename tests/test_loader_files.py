"""Files in the T-LoRA reference code's formats through the Loader node, on ComfyUI's real models.

How the files are made: ``tests/reference_files.py`` writes tensors with the reference code's exact
key layout, dtypes and containers (SDXL: diffusers ``save_attn_procs`` safetensors with
``q_layer / p_layer / lambda_layer / base_*`` (Ortho) or ``down / up`` (Vanilla) per attention
processor; FLUX: a ``torch.save``d dict ``lora.pt`` of ``*_lora.{down,up}.weight`` per processor).
Here the reference code's forward is re-stated independently: the factors are mapped by hand onto
the tiny models' module paths and merged into the weights before every model call,

    SDXL Ortho:   W + p diag(lambda m_t) q - base_p diag(base_lambda m_t) base_q
    Vanilla:      W + up diag(m_t) down
    m_t:          first int(((1000 - t) / 1000) ** power * (R - min_rank)) + min_rank ranks,
                  t = discrete timestep (SDXL) or 1000 * sigma (FLUX, no exponent in its code),

and compared per model call with sampling through the Loader (tolerance: test_loader_patch.py).
The real-size tests check that every target of full-size files lands on a module of ComfyUI's
real SDXL / FLUX (built on the meta device) with the right shape.
"""

from __future__ import annotations

import importlib
import logging

import loader_fixtures as lf
import pytest
import reference_files as rf
import torch

pytestmark = pytest.mark.comfy

REL_TOL = 2e-5
# diffusers attention block -> ComfyUI (LDM) path in the tiny SDXL (channel_mult [1, 2],
# transformer_depth [0, 1], transformer_depth_output [0, 0, 1, 1]), written out by hand.
TINY_SDXL_BLOCKS = {
    "down_blocks.1.attentions.0": "input_blocks.3.1",
    "mid_block.attentions.0": "middle_block.1",
    "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.attentions.1": "output_blocks.1.1",
}


@pytest.fixture(scope="module")
def loader(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.loader")


def tiny_sdxl_path(diffusers_name: str) -> str:
    block, rest = diffusers_name.split(".transformer_blocks.", 1)
    return f"{TINY_SDXL_BLOCKS[block]}.transformer_blocks.{rest}"


def sdxl_reference_layers(variant: str, rank: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (out_f, in_f) in rf.sdxl_attention_layers(lf.comfy_runtime.TINY_SDXL_CONFIG).items():
        layers[name] = (rf.random_ortho(out_f, in_f, rank, gen, drift=0.3) if variant == "ortho"
                        else rf.random_vanilla(out_f, in_f, rank, gen))
    return layers


def factors_of(layer, rank: int, min_rank: int, power: float, rows=None) -> lf.Factors:
    d = torch.float64
    if isinstance(layer, rf.Ortho):
        f = lf.Factors(layer.A.to(d), layer.B.to(d), layer.S.to(d), layer.A0.to(d), layer.B0.to(d),
                       layer.S0.to(d))
    else:
        f = lf.Factors(layer.down.to(d), layer.up.to(d))
    f.out_rows, f.rank, f.min_rank, f.power = rows, rank, min_rank, power
    return f


def compare_sampling(comfy, base, model, factors, family, steps=4) -> None:
    reference = base.clone()
    lf.install_merged_reference(reference, [(factors, 1.0)], family)
    got, want, plain = [], [], []
    for patcher, record in ((model, got), (reference, want), (base, plain)):
        clone = patcher.clone()
        lf.install_recorder(clone, record)
        comfy.sample(clone, family, steps=steps, cfg=2.0, size=16)
    scale = max(out.abs().max().item() for _, out in want)
    for (_, a), (_, b) in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=REL_TOL * scale)
    assert max((a - b).abs().max().item() for (_, a), (_, b) in zip(got, plain)) > 20 * REL_TOL * scale


@pytest.mark.parametrize("variant", ["ortho", "vanilla"])
def test_reference_sdxl_file_gives_the_reference_math(comfy, loader, loras_dir, variant):
    base = comfy.build_model("sdxl")
    layers = sdxl_reference_layers(variant, rank=8)
    rf.write_reference_sdxl(loras_dir / "pytorch_lora_weights.safetensors", layers)
    out = loader.TLoRALoader.execute(base, "pytorch_lora_weights.safetensors", 1.0, 2, 2.0, False)
    factors = {tiny_sdxl_path(name): [factors_of(layer, 8, 2, 2.0)] for name, layer in layers.items()}
    assert set(factors) == set(next(iter(out.result[0].attachments.values())).weights.adapters)
    assert len(factors) == 32
    compare_sampling(comfy, base, out.result[0], factors, "sdxl")


def test_reference_sdxl_file_defaults_to_half_the_rank(comfy, loader, loras_dir, caplog):
    base = comfy.build_model("sdxl")
    layers = sdxl_reference_layers("ortho", rank=8, seed=1)
    rf.write_reference_sdxl(loras_dir / "ref.safetensors", layers)
    with caplog.at_level(logging.WARNING):
        out = loader.TLoRALoader.execute(base, "ref.safetensors", 1.0, -1, 0.0, False)
    holder = next(iter(out.result[0].attachments.values()))
    assert {(a.schedule.rank, a.schedule.min_rank, a.schedule.power)
            for g in holder.weights.adapters.values() for a in g} == {(8, 4, 1.0)}
    assert "min_rank" in caplog.text and "ref.safetensors" in caplog.text


def test_reference_flux_lora_pt_gives_the_reference_math(comfy, loader, loras_dir):
    base = comfy.build_model("flux")
    hidden, rank = lf.comfy_runtime.TINY_FLUX_CONFIG["hidden_size"], 4
    gen = torch.Generator().manual_seed(3)
    layers = {name: rf.random_vanilla(out_f, in_f, rank, gen)
              for name, (out_f, in_f) in rf.flux_attention_layers(lf.comfy_runtime.TINY_FLUX_CONFIG).items()}
    rf.write_reference_flux_pt(loras_dir / "lora.pt", rf.reference_flux_state_dict(layers, hidden, rank, gen))
    out = loader.TLoRALoader.execute(base, "lora.pt", 1.0, 1, 0.0, False)

    rows = {"to_q": (0, hidden), "to_k": (hidden, 2 * hidden), "to_v": (2 * hidden, 3 * hidden)}
    where = {  # diffusers projection -> (BFL module, rows), written out by hand
        **{f"transformer_blocks.0.attn.{p}": ("double_blocks.0.img_attn.qkv", r) for p, r in rows.items()},
        **{f"transformer_blocks.0.attn.add_{p[3]}_proj": ("double_blocks.0.txt_attn.qkv", r)
           for p, r in rows.items()},
        "transformer_blocks.0.attn.to_out.0": ("double_blocks.0.img_attn.proj", None),
        **{f"single_transformer_blocks.0.attn.{p}": ("single_blocks.0.linear1", r) for p, r in rows.items()},
    }
    assert set(where) == set(layers)
    factors: dict[str, list] = {}
    for name, layer in layers.items():
        module, r = where[name]
        factors.setdefault(module, []).append(factors_of(layer, rank, 1, 1.0, r))
    holder = next(iter(out.result[0].attachments.values()))
    assert set(holder.weights.adapters) == set(factors)
    compare_sampling(comfy, base, out.result[0], factors, "flux")


def test_real_size_files_map_every_target_to_a_module_of_the_right_shape(comfy, pack, tmp_path):
    patch = importlib.import_module(f"{pack.__name__}.nodes.patch")
    fmt = importlib.import_module(f"{pack.__name__}.tlora_core.files.read")
    validate = importlib.import_module(f"{pack.__name__}.tlora_core.inventory")
    gen = torch.Generator().manual_seed(0)

    sdxl = comfy.build_model("sdxl", comfy.REAL_SDXL_CONFIG, device="meta")
    layers = {name: rf.random_vanilla(o, i, 1, gen)
              for name, (o, i) in rf.sdxl_attention_layers(comfy.REAL_SDXL_CONFIG).items()}
    path = rf.write_reference_sdxl(tmp_path / "sdxl.safetensors", layers)
    weights = fmt.load_tlora_file(path, validate.inventory_from_module(sdxl.diffusion_model), min_rank=1)
    modules = patch.check_targets(sdxl.diffusion_model, weights)
    assert len(modules) == len(layers) == 560
    assert all(".attn1." in n or ".attn2." in n for n in modules)

    flux = comfy.build_model("flux", comfy.REAL_FLUX_CONFIG, device="meta")
    hidden = comfy.REAL_FLUX_CONFIG["hidden_size"]
    layers = {name: rf.random_vanilla(o, i, 1, gen)
              for name, (o, i) in rf.flux_attention_layers(comfy.REAL_FLUX_CONFIG).items()}
    path = rf.write_reference_flux_pt(tmp_path / "lora.pt", rf.reference_flux_state_dict(layers, hidden, 1, gen))
    weights = fmt.load_tlora_file(path, validate.inventory_from_module(flux.diffusion_model), min_rank=1)
    modules = patch.check_targets(flux.diffusion_model, weights)
    # 19 double blocks: img qkv (3 adapters), txt qkv (3), img proj; 38 single blocks: linear1 (3)
    assert len(modules) == 19 * 3 + 38
    assert sum(len(g) for g in weights.adapters.values()) == 19 * 7 + 38 * 3 == len(layers)
    linear1 = weights.adapters["single_blocks.37.linear1"]
    assert sorted(a.out_rows for a in linear1) == [(0, hidden), (hidden, 2 * hidden), (2 * hidden, 3 * hidden)]
