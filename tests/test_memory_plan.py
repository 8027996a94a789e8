"""training/memory.py's working set against bench/train_memory.py's exact meta-device model, and
bench/fit_gpu.py's partial loading against ComfyUI's own, at real size on the meta device.

The exact model runs the real model with the trainer's adapter hooks and counts what autograd
keeps; the working set estimates the same from module names and shapes alone. Tolerances (what
the families give at 1024 x 1024, their recipes, with a margin): activations -10% .. +35% (the
block inputs a checkpoint keeps are counted almost exactly, -5% .. 0%; a UNet's layers between its
blocks are over-counted, +21% / +29% for SD 1.5 / SDXL), the largest block's recompute -20% ..
+35% (each layer's input and output counted once: Z-Image's gated MLP keeps more, -14%;
Qwen-Image's and SDXL's less, +14% / +18%), and the working set without its slack never under the
exact need nor more than 40% over it (its parts are summed, though their peaks fall at different
moments of a step: +3% .. +35%). Both count the weight copies backward keeps only where a layer
computes on a cast (none here: bf16 weights, fully loaded).
"""

from __future__ import annotations

import pytest

from comfy_runtime import REPO, TINY_SDXL_CONFIG, load_bench

pytestmark = pytest.mark.comfy
GIB = 2 ** 30


def _bench(name: str):
    return load_bench(name)


def _families() -> list:
    import family_configs

    return [pytest.param(f, marks=pytest.mark.runtimes(*t.runtimes))
            for f, t in family_configs.TINY.items() if not t.variant_of]


def _compare(family: str, image: int = 1024, checkpointing: bool = True, tokens: int | None = None):
    """(the estimate, the exact model) for the family's recipe at this geometry, bf16 compute."""
    import torch
    from comfyui_tlora.tlora_core import families
    from comfyui_tlora.training import memory
    from comfyui_tlora.training.targets import find_targets

    tm = _bench("train_memory")
    variant, rank, _, recipe_tokens = tm.RECIPES[family]
    tokens = tokens or recipe_tokens
    exact = tm.predict(family, image=image, checkpointing=checkpointing, device="gpu", tokens=tokens)
    spec = families.get(family)
    dm = tm.meta_model(family).diffusion_model
    side = image // spec.latent_downscale
    latent = (1, spec.latent_channels, *(1,) * (spec.latent_ndim - 4), side, side)
    ws = memory.working_set(dm, spec, find_targets(dm, spec), variant=variant, rank=rank, optimizer_copies=2,
                            latent_shape=latent, context_tokens=tokens, compute_dtype=torch.bfloat16,
                            checkpointing=checkpointing)
    return ws, exact


def _check_bounds(ws, exact) -> None:
    activations = ws.activations / (exact["forward_saved_gib"] * GIB) - 1
    assert -0.10 <= activations <= 0.35, (ws, exact["forward_saved_gib"])
    if exact["setting"]["checkpointing"]:
        recompute = ws.recompute / (exact["largest_block_recompute_gib"] * GIB) - 1
        assert -0.20 <= recompute <= 0.35, (ws, exact["largest_block_recompute_gib"])
    else:
        assert ws.recompute == 0
    need = (exact["peak_gib"] - exact["base_gib"] - exact["context_gib"]) * GIB
    assert need <= ws.total - ws.slack <= 1.4 * need, (ws, need / GIB)


@pytest.mark.parametrize("family", _families())
def test_working_set_bounds_the_exact_model_of_every_family(comfy, family):
    ws, exact = _compare(family)
    _check_bounds(ws, exact)


@pytest.mark.parametrize("family,image,checkpointing,tokens", [
    ("sdxl", 512, False, None), ("flux", 1024, True, 77), ("qwen_image", 512, True, 32)],
    ids=["sdxl-512-no-checkpointing", "flux-77-tokens", "qwen-image-512-32-tokens"])
def test_working_set_follows_the_geometry(comfy, family, image, checkpointing, tokens):
    ws, exact = _compare(family, image, checkpointing, tokens)
    _check_bounds(ws, exact)


def test_working_set_exact_parts_and_description(comfy):
    import torch
    from comfyui_tlora.tlora_core import families
    from comfyui_tlora.training import memory
    from comfyui_tlora.training.modules import adapter_memory
    from comfyui_tlora.training.targets import find_targets

    dm = _bench("train_memory").meta_model("flux").diffusion_model
    spec = families.get("flux")
    targets = find_targets(dm, spec)
    kwargs = dict(latent_shape=(2, 16, 64, 64), context_tokens=256, compute_dtype=torch.bfloat16,
                  checkpointing=True)
    for variant, copies in (("tlora", 2), ("vanilla", 4)):
        ws = memory.working_set(dm, spec, targets, variant=variant, rank=8, optimizer_copies=copies, **kwargs)
        need = adapter_memory(targets, variant, 8, copies)
        assert (ws.adapter_state, ws.step_factors) == (need["state_bytes"], need["step_factor_bytes"])
        assert ws.offload_buffers == 0
        assert ws.slack == memory.SLACK_FLOOR + int(memory.SLACK_FRACTION * (ws.activations + ws.recompute))
        assert ws.total == sum((ws.adapter_state, ws.step_factors, ws.activations, ws.recompute, ws.slack))
    assert (ws.step_factors, ws.total > 0) == (0, True)   # Vanilla: the parameters are the factors
    line = ws.describe()
    assert "\n" not in line and f"{ws.total / GIB:.2f} GiB" in line and "recompute" in line
    # Batch 2 keeps twice what batch 1 keeps (not the adapters' state; no weight copies here: the
    # bf16 weights are resident plain tensors).
    one = memory.working_set(dm, spec, targets, variant="vanilla", rank=8, optimizer_copies=4,
                             **{**kwargs, "latent_shape": (1, 16, 64, 64)})
    assert (ws.activations, ws.recompute) == (2 * one.activations, 2 * one.recompute)
    assert ws.adapter_state == one.adapter_state


def test_weight_copies_count_where_layers_compute_on_a_cast(comfy):
    """Resident plain layers compute on zero-copy aliases (nothing kept beyond the weight); a
    streamed layer keeps its private copy, an fp8 layer its cast: the same bytes in the compute dtype."""
    import torch
    from comfyui_tlora.tlora_core import families
    from comfyui_tlora.training import memory
    from comfyui_tlora.training.targets import find_targets

    tm = _bench("train_memory")
    spec = families.get("flux")
    kwargs = dict(variant="vanilla", rank=32, optimizer_copies=2, latent_shape=(1, 16, 128, 128),
                  context_tokens=512, compute_dtype=torch.bfloat16, checkpointing=True)
    plain = tm.meta_model("flux").diffusion_model
    fp8 = tm.meta_model("flux", dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16).diffusion_model
    resident = memory.working_set(plain, spec, find_targets(plain, spec), **kwargs)
    streamed = memory.working_set(plain, spec, find_targets(plain, spec), streamed=memory.streamable(plain),
                                  num_streams=2, **kwargs)
    cast = memory.working_set(fp8, spec, find_targets(fp8, spec), **kwargs)
    assert resident.recompute < streamed.recompute == cast.recompute
    assert resident.activations < streamed.activations == cast.activations   # the output projection's copy
    largest_blocks = streamed.recompute - resident.recompute
    assert 2 * 3072 * 21504 <= largest_blocks <= 2 * 340e6   # a block's weights, bf16: linear1 .. a double block
    assert resident.offload_buffers == cast.offload_buffers == 0 < streamed.offload_buffers


def test_layer_tokens_follow_the_model(comfy):
    from comfyui_tlora.tlora_core import families
    from comfyui_tlora.training import memory
    from comfyui_tlora.training.prepare import checkpoint_blocks

    tm = _bench("train_memory")

    def tokens(family, latent, text):
        spec = families.get(family)
        dm = tm.meta_model(family).diffusion_model
        blocks = list(checkpoint_blocks(dm, spec.checkpoint_blocks))
        return {layer.name: (layer.tokens, layer.keeps)
                for layer in memory._layers(dm, spec, latent, text, blocks, {})}

    sdxl = tokens("sdxl", (1, 4, 128, 128), 77)   # levels of 128, 64 and 32 latent pixels
    assert sdxl["input_blocks.1.0.in_layers.2"][0] == 128 * 128
    assert sdxl["input_blocks.4.1.transformer_blocks.0.attn1.to_q"][0] == 64 * 64
    assert sdxl["middle_block.1.transformer_blocks.0.attn1.to_q"][0] == 32 * 32
    assert sdxl["output_blocks.2.2.conv"][0] == 64 * 64   # the Upsample's convolution: doubled
    assert sdxl["output_blocks.3.1.transformer_blocks.0.attn1.to_q"][0] == 64 * 64
    assert sdxl["input_blocks.4.1.transformer_blocks.0.attn2.to_k"] == (77, False)   # the conditioning
    assert sdxl["input_blocks.4.0.emb_layers.1"] == (0, False)
    flux = tokens("flux", (1, 16, 128, 128), 512)   # 2 x 2 patches: 4096 image tokens
    assert flux["double_blocks.0.img_attn.qkv"][0] == 4096
    assert flux["double_blocks.0.txt_mlp.0"][0] == 512
    assert flux["single_blocks.0.linear1"][0] == 4096 + 512
    assert flux["single_blocks.0.modulation.lin"] == (0, False)
    # Outside the blocks only the output projection keeps anything (after the last block).
    assert flux["final_layer.linear"][1] and not flux["txt_in"][1] and not flux["img_in"][1]
    assert tokens("qwen_image", (1, 16, 1, 128, 128), 100)["transformer_blocks.0.attn.add_q_proj"][0] == 100


def test_offload_buffers_are_the_largest_casts_in_flight(comfy):
    import comfy.model_management as mm
    import comfy.ops
    import torch
    from comfyui_tlora.training import memory

    layers = {f"l{i}": comfy.ops.manual_cast.Linear(64 * (i + 1), 64, dtype=torch.float8_e4m3fn) for i in range(4)}
    sizes = sorted((mm.module_size(m) for m in layers.values()), reverse=True)
    assert sizes[0] == 64 * 256 + 64   # fp8 weight, fp8 bias: one byte each
    # Two streams: the two largest casts, plus one conversion of the largest to bf16.
    assert memory.offload_buffers(layers, torch.bfloat16, 2) == sizes[0] + sizes[1] + 2 * (64 * 256 + 64)
    assert memory.offload_buffers(layers, torch.bfloat16, 0) == sizes[0] + 2 * (64 * 256 + 64)
    assert memory.offload_buffers({}, torch.bfloat16, 2) == 0
    plain = {"a": comfy.ops.manual_cast.Linear(128, 64, dtype=torch.bfloat16)}
    assert memory.offload_buffers(plain, torch.bfloat16, 2) == mm.module_size(plain["a"])   # no conversion


def test_meta_partial_load_picks_what_comfyui_picks_on_a_real_model(comfy, monkeypatch):
    """bench/fit_gpu.py runs ComfyUI's ModelPatcher.load on the meta device: on the same tiny
    SDXL with real weights on the CPU, ComfyUI's load keeps the same layers resident."""
    import comfy.model_management as mm
    import torch
    from comfyui_tlora.training import memory

    fit = _bench("fit_gpu")
    patcher = comfy.build_model("sdxl", TINY_SDXL_CONFIG)
    budget = patcher.model_size() // 2
    monkeypatch.setattr(mm, "NUM_STREAMS", fit.NUM_STREAMS)
    patcher.load(torch.device("cpu"), lowvram_model_memory=budget)
    real = set(memory.streaming(patcher.model.diffusion_model))
    assert real < set(memory.streamable(patcher.model.diffusion_model))
    meta = fit.comfy_load("sdxl", torch.float32, budget, TINY_SDXL_CONFIG, compute_dtype=torch.float32)
    assert real and set(meta["streamed"]) == real
    assert meta["resident_bytes"] == patcher.model.model_loaded_weight_memory
    assert 0 < meta["resident_bytes"] <= budget < meta["model_bytes"]
    assert fit.comfy_load("sdxl", torch.float32, float("inf"), TINY_SDXL_CONFIG)["streamed"] == {}
    # An fp8 base streams the layers its casts make largest first: the same budget keeps more.
    fp8 = fit.comfy_load("sdxl", torch.float8_e4m3fn, budget, TINY_SDXL_CONFIG)
    assert fp8["model_bytes"] < meta["model_bytes"] and len(fp8["streamed"]) < len(real)


@pytest.mark.runtimes("0.33.0")
def test_readme_fit_table_is_the_generated_one(comfy):
    """Every family (0.33 has them all): the README's table is bench/fit_gpu.py's, and the fits
    behave: a larger card never streams more, a bf16 base never streams less than fp8."""
    fit = _bench("fit_gpu")
    results = {f: fit.family_fits(f) for f in fit.available(comfy.comfyui_version())}
    assert set(results) == set(comfy.families.ids())
    for family, by_base in results.items():
        for fits in by_base.values():
            streamed = [r["streamed_gib"] for r in fits if r["fits"]]
            assert streamed == sorted(streamed, reverse=True), family
            assert all(r["peak_gib"] <= r["card_gb"] for r in fits if r["fits"]), family
        for bf16, fp8 in zip(by_base["bf16"], by_base["fp8"]):
            assert bf16["streamed_gib"] >= fp8["streamed_gib"] or not bf16["fits"], family
    assert results["sdxl"]["bf16"][-1]["streamed_layers"] == 0 and results["flux"]["bf16"][0]["streamed_layers"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert fit.markdown(results) in readme
