"""Readers of foreign LoRA files: each reproduces the source tool's forward, at several masks.

The reference formulas are written out here independently of the readers (from the T-LoRA code,
LyCORIS and kohya), applied to the same base Linear, and compared with our adapters attached by
:func:`tlora_core.apply.attach` (the path the loader uses), with a different timestep per sample.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference_files as rf
import torch
from safetensors.torch import load_file

from comfy_runtime import REAL_FLUX_CONFIG, REAL_SDXL_CONFIG, TINY_FLUX_CONFIG, TINY_SDXL_CONFIG
from tlora_core.apply import attach, detach
from tlora_core.families.unet_names import SdxlLayout, sdxl_ldm_to_diffusers
from tlora_core.files import foreign, foreign_tlora
from tlora_core.files.check import TLoRAFileError
from tlora_core.files.names import ModuleIndex
from tlora_core.masks import RankState

TINY_SDXL = rf.sdxl_inventory(TINY_SDXL_CONFIG)
TINY_FLUX = rf.flux_inventory(TINY_FLUX_CONFIG)
TIMESTEPS = [0.0, 1.0, 250.0, 500.0, 733.0, 999.0, 1000.0]
# fp32 products of width <= 256 with O(1) values: rounding differences stay below 1e-5; 1e-4
# still catches any wrong column, sign, scale or mask (those are O(1e-2) or larger here).
ATOL = 1e-4


def sdxl_mask(t: float, rank: int, min_rank: int, alpha: float = 1.0, T: int = 1000) -> torch.Tensor:
    """The reference SDXL code's get_mask_by_timestep."""
    r = int(((T - t) / T) ** alpha * (rank - min_rank)) + min_rank
    mask = torch.zeros((1, rank))
    mask[:, :r] = 1.0
    return mask


def flux_mask(t: float, rank: int, min_rank: int, T: int = 1000) -> torch.Tensor:
    """The reference FLUX code's get_rank_by_timestep (no exponent)."""
    r = int((T - t) * (rank - min_rank) / T) + min_rank
    mask = torch.zeros((1, rank))
    mask[:, :r] = 1.0
    return mask


def base_linears(inventory, modules, seed=0) -> dict[str, torch.nn.Linear]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path in sorted(modules):   # sorted: a set's order changes with PYTHONHASHSEED
        n, m = inventory[path]
        lin = torch.nn.Linear(m, n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, m, generator=gen) / m ** 0.5)
        out[path] = lin
    return out


def run_ours(weights, linears, x, t_per_sample) -> dict[str, torch.Tensor]:
    """Each module's output with the adapters attached, one timestep per sample of x."""
    state = RankState()
    handles = attach(linears, weights.adapters, state)
    try:
        with torch.no_grad(), state.at(torch.tensor(t_per_sample)):
            return {path: lin(x[path]) for path, lin in linears.items()}
    finally:
        detach(handles)


def inputs(linears, batch=2, tokens=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randn(batch, tokens, lin.in_features, generator=gen) for p, lin in linears.items()}


def ortho_ref(x, W, f: rf.Ortho, mask):
    """Official OrthogonalLoRALinearLayer: p(q(x) * lambda * m) - base_p(base_q(x) * base_lambda * m)."""
    lora = (x @ f.A.T * f.S * mask) @ f.B.T - (x @ f.A0.T * f.S0 * mask) @ f.B0.T
    return x @ W.T + lora


def vanilla_ref(x, W, f: rf.Vanilla, mask):
    """Official LoRALinearLayer: up(down(x) * m)."""
    return x @ W.T + (x @ f.down.T * mask) @ f.up.T


def per_sample(ref, x, t_pair, mask_fn):
    return torch.stack([ref(x[b], mask_fn(t_pair[b])) for b in range(len(t_pair))])


@pytest.mark.parametrize("variant", ["ortho", "vanilla"])
def test_reference_sdxl_reproduces_the_official_forward(tmp_path, variant):
    gen, rank, min_rank = torch.Generator().manual_seed(0), 4, 2
    layers = rf.sdxl_attention_layers(TINY_SDXL_CONFIG)
    make = rf.random_ortho if variant == "ortho" else rf.random_vanilla
    factors = {name: make(*shape, rank, gen) for name, shape in layers.items()}
    sd = load_file(rf.write_reference_sdxl(tmp_path / "pytorch_lora_weights.safetensors", factors))
    assert foreign.detect_format(sd.keys(), {"format": "pt"}) == "reference-sdxl"
    weights = foreign_tlora.read_reference_sdxl(sd, TINY_SDXL, min_rank=min_rank, power=1.0, source="f")
    assert (weights.variant, weights.source_format) == ({"ortho": "tlora"}.get(variant, "vanilla"),
                                                        "reference-sdxl")
    index = ModuleIndex(TINY_SDXL)
    module_of = {name: index.resolve(name).module for name in layers}
    assert set(weights.adapters) == set(module_of.values()) and len(module_of) == 32
    linears = base_linears(TINY_SDXL, weights.adapters)
    x = inputs(linears)
    ref = ortho_ref if variant == "ortho" else vanilla_ref
    for t_pair in zip(TIMESTEPS, reversed(TIMESTEPS)):
        ours = run_ours(weights, linears, x, list(t_pair))
        for name, path in module_of.items():
            W = linears[path].weight.detach()
            expected = per_sample(lambda xb, m, W=W, f=factors[name]: ref(xb, W, f, m), x[path], t_pair,
                                  lambda t: sdxl_mask(t, rank, min_rank))
            torch.testing.assert_close(ours[path], expected, atol=ATOL, rtol=0, msg=name)


def test_reference_sdxl_schedule_power_is_the_callers(tmp_path):
    gen = torch.Generator().manual_seed(3)
    name, shape = next(iter(rf.sdxl_attention_layers(TINY_SDXL_CONFIG).items()))
    factors = {name: rf.random_ortho(*shape, 8, gen)}
    sd = rf.reference_sdxl_state_dict(factors)
    weights = foreign_tlora.read_reference_sdxl(sd, TINY_SDXL, min_rank=3, power=2.0)
    path = ModuleIndex(TINY_SDXL).resolve(name).module
    linears = base_linears(TINY_SDXL, [path])
    x = inputs(linears, batch=1)
    for t in (100.0, 600.0, 900.0):
        W = linears[path].weight.detach()
        expected = ortho_ref(x[path][0], W, factors[name], sdxl_mask(t, 8, 3, alpha=2.0))
        torch.testing.assert_close(run_ours(weights, linears, x, [t])[path][0], expected, atol=ATOL, rtol=0)


def test_reference_sdxl_without_min_rank_uses_half_the_rank_and_says_so():
    gen = torch.Generator().manual_seed(4)
    name, shape = next(iter(rf.sdxl_attention_layers(TINY_SDXL_CONFIG).items()))
    sd = rf.reference_sdxl_state_dict({name: rf.random_ortho(*shape, 6, gen)})
    weights = foreign_tlora.read_reference_sdxl(sd, TINY_SDXL, min_rank=None, power=None, source="ref.safetensors")
    assert (weights.schedule.rank, weights.schedule.min_rank, weights.schedule.power) == (6, 3, 1.0)
    assert any("min_rank = 3" in w and "ref.safetensors" in w for w in weights.warnings)


@pytest.mark.parametrize("container", ["pt", "safetensors"])
def test_reference_flux_reproduces_the_official_forward_on_fused_rows(tmp_path, container):
    gen, rank, min_rank, h = torch.Generator().manual_seed(0), 4, 1, TINY_FLUX_CONFIG["hidden_size"]
    layers = rf.flux_attention_layers(TINY_FLUX_CONFIG)
    factors = {name: rf.random_vanilla(*shape, rank, gen) for name, shape in layers.items()}
    sd = rf.reference_flux_state_dict(factors, h, rank, gen)
    if container == "pt":
        sd = torch.load(rf.write_reference_flux_pt(tmp_path / "lora.pt", sd), weights_only=True)
    else:
        sd = load_file(rf.write_safetensors(tmp_path / "lora.safetensors", sd))
    assert len(sd) == 2 * 7 * (TINY_FLUX_CONFIG["depth"] + TINY_FLUX_CONFIG["depth_single_blocks"])
    assert foreign.detect_format(sd.keys(), {}) == "reference-flux"
    weights = foreign_tlora.read_reference_flux(sd, TINY_FLUX, min_rank=min_rank, power=1.0, source="lora.pt")
    assert any("8 key(s) ignored" in w and "never applies" in w for w in weights.warnings)
    index = ModuleIndex(TINY_FLUX)
    linears = base_linears(TINY_FLUX, weights.adapters)
    x = inputs(linears)
    for t_pair in ((0.0, 1000.0), (137.5, 862.5), (500.0, 999.0)):
        ours = run_ours(weights, linears, x, list(t_pair))
        touched = {p: torch.zeros(linears[p].out_features, dtype=torch.bool) for p in linears}
        for name, f in factors.items():
            target = index.resolve(name)
            lo, hi = target.out_rows or (0, linears[target.module].out_features)
            W = linears[target.module].weight.detach()[lo:hi]
            expected = per_sample(lambda xb, m, W=W, f=f: vanilla_ref(xb, W, f, m), x[target.module],
                                  t_pair, lambda t: flux_mask(t, rank, min_rank))
            torch.testing.assert_close(ours[target.module][..., lo:hi], expected, atol=ATOL, rtol=0,
                                       msg=name)
            touched[target.module][lo:hi] = True
        for path, rows in touched.items():   # e.g. linear1's MLP rows stay the base output
            plain = x[path] @ linears[path].weight.detach().T
            torch.testing.assert_close(ours[path][..., ~rows], plain[..., ~rows], atol=0, rtol=0)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_lycoris_rebuilds_its_base_and_reproduces_its_forward(family):
    inventory = TINY_SDXL if family == "sdxl" else TINY_FLUX
    names = (["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
              "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
              "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0"] if family == "sdxl" else
             ["transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_q_proj",
              "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp",
              "transformer_blocks.0.ff.net.2"])
    index, gen, rank, alpha, min_rank = ModuleIndex(inventory), torch.Generator().manual_seed(5), 4, 2.0, 2
    targets = {n: index.resolve(n) for n in names}
    linears = base_linears(inventory, {t.module for t in targets.values()})
    base = {p: lin.weight.detach() for p, lin in linears.items()}

    def named_weight(n):
        lo, hi = targets[n].out_rows or (0, base[targets[n].module].shape[0])
        return base[targets[n].module][lo:hi]

    factors = {n: rf.trained_lycoris(named_weight(n), rank, alpha, gen) for n in names}
    sd = rf.lycoris_state_dict(factors)
    assert foreign.detect_format(sd.keys(), {}) == "lycoris"
    weights = foreign_tlora.read_lycoris(sd, inventory, min_rank=min_rank, power=1.0, base_weights=base)
    assert any("recomputed" in w and "bit-identical" in w for w in weights.warnings)
    x = inputs(linears)
    for t_pair in zip(TIMESTEPS, reversed(TIMESTEPS)):
        ours = run_ours(weights, linears, x, list(t_pair))
        for n, f in factors.items():
            W = named_weight(n)
            # Base factors from numpy's float64 SVD: another algorithm, same top-r components.
            u, s, vh = np.linalg.svd(W.double().numpy(), full_matrices=False)
            P0, S0, Q0 = (torch.from_numpy(a) for a in (u[:, :rank], s[:rank], vh[:rank]))

            def ref(xb, m, W=W, f=f, P0=P0, S0=S0, Q0=Q0):
                xd, md = xb.double(), m.double()
                diff = (xd @ f.q.double().T * f.lam.double() * md) @ f.p.double().T \
                    - (xd @ Q0.T * S0 * md) @ P0.T
                return (xd @ W.double().T + alpha / rank * diff).float()

            lo, hi = targets[n].out_rows or (0, W.shape[0])
            expected = per_sample(ref, x[targets[n].module], t_pair, lambda t: sdxl_mask(t, rank, min_rank))
            torch.testing.assert_close(ours[targets[n].module][..., lo:hi], expected, atol=ATOL, rtol=0,
                                       msg=n)


def test_lycoris_needs_the_base_weights():
    gen = torch.Generator().manual_seed(6)
    sd = rf.lycoris_state_dict({"transformer_blocks.0.attn.to_q": rf.trained_lycoris(
        torch.randn(64, 64, generator=gen), 4, 4.0, gen)})
    with pytest.raises(TLoRAFileError, match="do not store their frozen base factors.*base_weights"):
        foreign_tlora.read_lycoris(sd, TINY_FLUX, min_rank=2, source="x.safetensors")
    with pytest.raises(TLoRAFileError, match="no base weight given for module 'double_blocks.0.img_attn"):
        foreign_tlora.read_lycoris(sd, TINY_FLUX, min_rank=2, base_weights={})


def kohya_layers(inventory, paths, rank, gen, alpha):
    return {p: (torch.randn(rank, inventory[p][1], generator=gen),
                0.1 * torch.randn(inventory[p][0], rank, generator=gen), alpha) for p in paths}


@pytest.mark.parametrize("style, names", [
    ("kohya", "model"), ("kohya", "diffusers"), ("lycoris", "diffusers"), ("comfy", "model"),
    ("peft-unet", "diffusers")])
def test_plain_sdxl_lora_adds_alpha_over_rank_up_down(style, names):
    gen, rank, alpha = torch.Generator().manual_seed(7), 4, 2.0 if style != "peft-unet" else None
    layout = SdxlLayout.from_inventory(TINY_SDXL)
    paths = ["input_blocks.3.1.transformer_blocks.0.attn1.to_q", "output_blocks.1.1.proj_out",
             "middle_block.1.transformer_blocks.0.ff.net.0.proj", "output_blocks.3.0.emb_layers.1"]
    layers = kohya_layers(TINY_SDXL, paths, rank, gen, alpha)
    named = {(p if names == "model" else sdxl_ldm_to_diffusers(p, layout)): v
             for p, v in layers.items()}
    sd = rf.plain_lora_state_dict(named, style)
    assert foreign.detect_format(sd.keys(), {}) == "lora"
    weights = foreign.read_plain_lora(sd, TINY_SDXL, min_rank=None, power=None, refactor=False)
    assert weights.schedule is None and weights.variant == "lora" and set(weights.adapters) == set(paths)
    linears = base_linears(TINY_SDXL, paths)
    x = inputs(linears)
    ours = run_ours(weights, linears, x, [0.0, 1000.0])   # unmasked: the timestep is irrelevant
    scale = (alpha or rank) / rank
    for p, (down, up, _) in layers.items():
        expected = x[p] @ linears[p].weight.detach().T + scale * (x[p] @ down.T) @ up.T
        torch.testing.assert_close(ours[p], expected, atol=ATOL, rtol=0)


def test_refactored_lora_keeps_the_delta_and_masks_weakest_components_first():
    gen, rank, min_rank = torch.Generator().manual_seed(8), 6, 2
    paths = ["double_blocks.0.img_attn.proj", "single_blocks.0.linear2"]
    layers = kohya_layers(TINY_FLUX, paths, rank, gen, 3.0)
    sd = rf.plain_lora_state_dict(layers, "kohya")
    weights = foreign.read_plain_lora(sd, TINY_FLUX, min_rank=min_rank, power=1.0, refactor=True)
    linears = base_linears(TINY_FLUX, paths)
    eye = {p: torch.eye(lin.in_features).unsqueeze(0) for p, lin in linears.items()}
    for t, active in ((0.0, rank), (1000.0, min_rank), (500.0, int(0.5 * (rank - min_rank)) + min_rank)):
        ours = run_ours(weights, linears, eye, [t])
        for p, (down, up, alpha) in layers.items():
            delta = (ours[p][0] - linears[p].weight.detach().T).T.double()   # (out, in) applied delta
            dense = (alpha / rank) * up.double() @ down.double()
            u, s, vh = torch.linalg.svd(dense)
            best = (u[:, :active] * s[:active]) @ vh[:active]   # Eckart-Young: top-`active` components
            torch.testing.assert_close(delta, best, atol=ATOL, rtol=0, msg=f"{p} t={t}")


def test_plain_flux_diffusers_lora_lands_on_fused_rows():
    gen, rank, h = torch.Generator().manual_seed(9), 2, TINY_FLUX_CONFIG["hidden_size"]
    names = {"transformer_blocks.0.attn.to_v": (h, h), "single_transformer_blocks.0.proj_mlp": (4 * h, h)}
    layers = {n: (torch.randn(rank, s[1], generator=gen), torch.randn(s[0], rank, generator=gen), None)
              for n, s in names.items()}
    weights = foreign.read_plain_lora(rf.plain_lora_state_dict(layers, "peft-transformer"), TINY_FLUX)
    assert {p: [a.out_rows for a in g] for p, g in weights.adapters.items()} == {
        "double_blocks.0.img_attn.qkv": [(2 * h, 3 * h)], "single_blocks.0.linear1": [(3 * h, 7 * h)]}


@pytest.mark.parametrize("keys, metadata, expected", [
    (["lora_unet_a.lora_down.weight"], {"tlora.format_version": "1"}, "tlora"),
    (["down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.q_layer.weight"], {},
     "reference-sdxl"),
    (["up_blocks.0.attentions.1.transformer_blocks.2.attn2.processor.to_out_lora.down.weight"], None,
     "reference-sdxl"),
    (["single_transformer_blocks.3.attn.processor.to_v_lora.up.weight"], {}, "reference-flux"),
    (["lycoris_transformer_blocks_0_attn_to_q.lambda_layer", "lycoris_x.alpha"], {}, "lycoris"),
    (["lycoris_down_blocks_1_x.lora_up.weight"], {}, "lora"),
    (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], {}, "lora"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], {}, "lora"),
    (["model.diffusion_model.input_blocks.0.0.weight"], {}, "unknown"),
    ([], {}, "unknown"),
])
def test_detect_format(keys, metadata, expected):
    assert foreign.detect_format(keys, metadata) == expected


def test_sdxl_file_on_a_flux_model_names_both_architectures():
    gen = torch.Generator().manual_seed(10)
    factors = {n: rf.random_ortho(*s, 2, gen) for n, s in rf.sdxl_attention_layers(TINY_SDXL_CONFIG).items()}
    with pytest.raises(TLoRAFileError,
                       match=r"^t\.safetensors: none of its layers.*made for SDXL.*model is FLUX"):
        foreign_tlora.read_reference_sdxl(rf.reference_sdxl_state_dict(factors), TINY_FLUX, min_rank=1,
                                    source="t.safetensors")


def test_flux_file_on_an_sdxl_model_names_both_architectures():
    gen = torch.Generator().manual_seed(11)
    layers = rf.flux_attention_layers(TINY_FLUX_CONFIG)
    factors = {n: rf.random_vanilla(*s, 2, gen) for n, s in layers.items()}
    with pytest.raises(TLoRAFileError, match=r"made for FLUX.*model is SDXL.*transformer_blocks"):
        foreign_tlora.read_reference_flux(rf.reference_flux_state_dict(factors, 64, 2), TINY_SDXL, min_rank=1)


def test_shape_mismatch_names_layer_expected_and_found():
    gen = torch.Generator().manual_seed(12)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"   # 64 wide in the tiny SDXL
    sd = rf.reference_sdxl_state_dict({name: rf.random_ortho(64, 64, 4, gen)})
    with pytest.raises(TLoRAFileError, match=r"shape mismatch on layer '.*attn1\.to_q'.*'input_blocks\.4"
                                             r"\.1\.transformer_blocks\.0\.attn1\.to_q'.*out=640, in=640"
                                             r".*down \(8, 64\)"):
        foreign_tlora.read_reference_sdxl(sd, rf.sdxl_inventory(REAL_SDXL_CONFIG), min_rank=2)


@pytest.mark.parametrize("drop, mix, match", [
    ("base_lambda", False, r"has \['base_p.weight'.*Ortho.*vanilla"),
    (None, True, "mixes Ortho"),
])
def test_incomplete_or_mixed_reference_files_are_refused(drop, mix, match):
    gen = torch.Generator().manual_seed(13)
    items = list(rf.sdxl_attention_layers(TINY_SDXL_CONFIG).items())[:2]
    factors = {items[0][0]: rf.random_ortho(*items[0][1], 2, gen),
               items[1][0]: (rf.random_vanilla if mix else rf.random_ortho)(*items[1][1], 2, gen)}
    sd = rf.reference_sdxl_state_dict(factors)
    sd = {k: v for k, v in sd.items() if not (drop and k.endswith(drop))}
    with pytest.raises(TLoRAFileError, match=match):
        foreign_tlora.read_reference_sdxl(sd, TINY_SDXL, min_rank=1)


def test_partial_plain_lora_counts_what_it_ignores():
    gen = torch.Generator().manual_seed(14)
    good = kohya_layers(TINY_SDXL, ["output_blocks.0.1.transformer_blocks.0.attn2.to_v"], 2, gen, 1.0)
    sd = rf.plain_lora_state_dict(good, "kohya")
    sd["lora_unet_input_blocks_99_1_proj_in.lora_down.weight"] = torch.zeros(2, 4)
    sd["lora_unet_input_blocks_99_1_proj_in.lora_up.weight"] = torch.zeros(4, 2)
    for i in range(3):
        sd[f"lora_te1_text_model_encoder_layers_{i}_mlp_fc1.lora_down.weight"] = torch.zeros(2, 4)
    sd["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"] = torch.zeros(2, 4, 3, 3)
    sd["lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight"] = torch.zeros(32, 2, 1, 1)
    sd["lora_unet_x.hada_w1_a"] = torch.zeros(2, 2)
    weights = foreign.read_plain_lora(sd, TINY_SDXL, source="mix.safetensors")
    assert list(weights.adapters) == ["output_blocks.0.1.transformer_blocks.0.attn2.to_v"]
    text = "\n".join(weights.warnings)
    assert "3 key(s) ignored: text-encoder" in text
    assert "1 key(s) ignored: convolution" in text and "1 key(s) ignored: not LoRA" in text
    assert "1 layer key(s) match no module of this SDXL model" in text and "input_blocks_99" in text


@pytest.mark.parametrize("mutate, match", [
    (lambda sd: sd.pop("lora_unet_output_blocks_0_1_proj_in.lora_up.weight"), "needs both up and down"),
    (lambda sd: sd.__setitem__("lora_unet_output_blocks_0_1_proj_in.dora_scale", torch.ones(64, 1)), "DoRA"),
])
def test_broken_plain_loras_are_refused(mutate, match):
    gen = torch.Generator().manual_seed(15)
    layers = kohya_layers(TINY_SDXL, ["output_blocks.0.1.proj_in"], 2, gen, 1.0)
    sd = rf.plain_lora_state_dict(layers, "kohya")
    mutate(sd)
    with pytest.raises(TLoRAFileError, match=match):
        foreign.read_plain_lora(sd, TINY_SDXL)


def test_real_size_reference_sdxl_file_maps_all_560_attention_layers():
    gen, inventory = torch.Generator().manual_seed(16), rf.sdxl_inventory(REAL_SDXL_CONFIG)
    layers = rf.sdxl_attention_layers(REAL_SDXL_CONFIG)
    factors = {n: rf.random_ortho(out, inp, 1, gen) for n, (out, inp) in layers.items()}
    weights = foreign_tlora.read_reference_sdxl(rf.reference_sdxl_state_dict(factors), inventory, min_rank=1)
    assert len(weights.adapters) == 560
    assert set(weights.adapters) == {p for p in inventory if ".attn1." in p or ".attn2." in p}
    for path, (adapter,) in weights.adapters.items():
        assert (adapter.up.shape[0], adapter.in_features, adapter.parts) == (*inventory[path], 2)


def test_real_size_reference_flux_file_fills_the_fused_layers():
    gen, inventory, h = torch.Generator().manual_seed(17), rf.flux_inventory(REAL_FLUX_CONFIG), 3072
    factors = {n: rf.random_vanilla(h, h, 1, gen) for n in rf.flux_attention_layers(REAL_FLUX_CONFIG)}
    weights = foreign_tlora.read_reference_flux(rf.reference_flux_state_dict(factors, h, 1, gen), inventory,
                                          min_rank=1)
    assert len(weights.adapters) == 19 * 3 + 38
    for path, group in weights.adapters.items():
        rows = sorted(a.out_rows or (0, inventory[path][0]) for a in group)
        assert rows == ([(0, h), (h, 2 * h), (2 * h, 3 * h)] if path.endswith(("qkv", "linear1"))
                        else [(0, h)]), path
    assert any("304 key(s) ignored" in w for w in weights.warnings)   # 38 blocks x 4 unused x 2


def test_lycoris_reports_what_it_cannot_use():
    gen, rank = torch.Generator().manual_seed(18), 2
    name = "transformer_blocks.0.attn.to_out.0"
    weight = torch.randn(64, 64, generator=gen)
    f = rf.trained_lycoris(weight, rank, 0.0, gen)
    sd = rf.lycoris_state_dict({name: f})
    sd.update({"lycoris_x_embedder_conv.q_layer.weight": torch.zeros(rank, 16, 1, 1),
               "lycoris_x_embedder_conv.p_layer.weight": torch.zeros(64, rank, 1, 1),
               "lycoris_x_embedder_conv.lambda_layer": torch.ones(1, rank),
               "lycoris_transformer_blocks_7_attn_to_q.q_layer.weight": torch.zeros(rank, 64),
               "lycoris_transformer_blocks_7_attn_to_q.p_layer.weight": torch.zeros(64, rank),
               "lycoris_transformer_blocks_7_attn_to_q.lambda_layer": torch.ones(1, rank),
               "lycoris_transformer_blocks_0_ff_net_2.lora_up.weight": torch.zeros(64, rank),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(rank, 8)})
    weights = foreign_tlora.read_lycoris(sd, TINY_FLUX, min_rank=1, base_weights={
        "double_blocks.0.img_attn.proj": weight}, source="l.safetensors")
    assert list(weights.adapters) == ["double_blocks.0.img_attn.proj"]
    # alpha 0 means alpha = rank in LyCORIS: scale 1, so up's first part is p * lambda exactly
    torch.testing.assert_close(weights.adapters["double_blocks.0.img_attn.proj"][0].up[:, :rank],
                               f.p * f.lam, atol=0, rtol=0)
    text = "\n".join(weights.warnings)
    for expected in ("1 key(s) ignored: convolution", "1 key(s) ignored: text-encoder",
                     "1 key(s) ignored: not LyCORIS 'tlora'", "1 layer key(s) match no module",
                     "lycoris_transformer_blocks_7_attn_to_q"):
        assert expected in text, expected


@pytest.mark.parametrize("n, m, r", [(12, 10, 4), (5, 9, 7), (9, 3, 6)])
def test_refactor_lowrank_is_an_exact_orthonormal_svd(n, m, r):
    from tlora_core.refactor import refactor_lowrank

    gen = torch.Generator().manual_seed(n * 100 + m * 10 + r)
    down, up = torch.randn(r, m, generator=gen), torch.randn(n, r, generator=gen)
    new_down, new_up, s = refactor_lowrank(down, up)
    k = min(n, m, r)
    assert new_down.shape == (k, m) and new_up.shape == (n, k) and s.shape == (k,)
    torch.testing.assert_close(new_up @ new_down, up @ down, atol=1e-5, rtol=0)
    torch.testing.assert_close(new_down @ new_down.T, torch.eye(k), atol=1e-5, rtol=0)
    assert bool((s[:-1] >= s[1:]).all())
    torch.testing.assert_close(new_up.norm(dim=0), s, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.double(), torch.linalg.svdvals((up @ down).double())[:k], atol=1e-5, rtol=0)
