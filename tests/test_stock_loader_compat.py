"""A T-LoRA file we write loads in ComfyUI's STOCK LoRA path as the full-rank (t = 0) T-LoRA.

Real ComfyUI 0.3.75 on the CPU, tiny SDXL and FLUX built from ComfyUI's own classes. The file holds
Ortho factors with trained (non-init) values on every attention Linear (FLUX: the fused qkv with one
adapter per projection, attention proj, and linear1's q/k/v rows). Checked: ComfyUI's stock loaders
(``comfy.sd.load_lora_for_models`` and the ``LoraLoaderModelOnly`` node) leave no key unloaded, and
the stock-merged model's forward equals the base model plus our own adapters at full rank.
"""

from __future__ import annotations

import importlib
import logging
from types import SimpleNamespace

import pytest
import torch
from file_format_helpers import make_adapter

import comfy_runtime
import family_configs

pytestmark = pytest.mark.comfy

RANK, MIN_RANK = 4, 2
STOCK_WARNINGS = ("lora key not loaded", "NOT LOADED")


@pytest.fixture(scope="module")
def core(pack):
    names = ("adapter", "apply", "files.check", "files.read", "files.write", "inventory", "masks",
             "schedule", "weights")
    return SimpleNamespace(**{n.split(".")[-1]: importlib.import_module(f"{pack.__name__}.tlora_core.{n}")
                              for n in names})


def adapted_layers(family: str, inventory: dict) -> dict[str, list]:
    """module -> output rows per adapter: attention Linears; FLUX fused layers one per projection
    (written out here for FLUX; other families: their own attention targets)."""
    if family != "flux":
        layers: dict[str, list] = {}
        for t in comfy_runtime.family_spec(family).targets(inventory):
            layers.setdefault(t.module, []).append(t.out_rows)
        return layers
    layers = {}
    for path, (out, inp) in inventory.items():
        if path.endswith("_attn.qkv"):
            layers[path] = [(i * out // 3, (i + 1) * out // 3) for i in range(3)]
        elif path.endswith("linear1"):                 # [q | k | v | mlp]: adapters on q, k, v only
            layers[path] = [(i * inp, (i + 1) * inp) for i in range(3)]
        elif path.endswith("_attn.proj"):
            layers[path] = [None]
    return layers


def trained_tlora(core, family: str, inventory: dict):
    gen = torch.Generator().manual_seed(7)
    adapters = {}
    for module, rows_list in adapted_layers(family, inventory).items():
        out, inp = inventory[module]
        group = []
        for rows in rows_list:
            a = make_adapter(core, "tlora", out if rows is None else rows[1] - rows[0], inp, RANK,
                             MIN_RANK, gen=gen, out_rows=rows)
            a.up.mul_(0.2)         # a clear but sane change of the tiny model's output
            group.append(a)
        adapters[module] = group
    return core.weights.TLoRAWeights(adapters, family_configs.registry_id(family), "tlora", core.adapter.RankSchedule(RANK, MIN_RANK),
                                     "tlora")


def model_inputs(family: str) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a raw call of the tiny diffusion model on a batch of 2."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(comfy_runtime.latent_shape(family, 2, 8), generator=gen)
    flow = comfy_runtime.family_spec(family).timestep == "flow"
    t = torch.tensor([0.9, 0.05]) if flow else torch.tensor([999.0, 10.0])
    ctx, extra = family_configs.raw_inputs(family, 2, gen)
    return (x, t, ctx), extra


def stock_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(STOCK_WARNINGS)]


@torch.no_grad()
def test_stock_loader_merges_our_file_as_the_full_rank_tlora(comfy, core, family, tiny_model, tmp_path,
                                                             caplog, monkeypatch):
    import comfy.sd
    import comfy.utils
    import folder_paths
    import nodes

    dm = tiny_model.model.diffusion_model
    inventory = core.inventory.inventory_from_module(dm)
    assert core.check.detect_architecture(inventory) == family_configs.registry_id(family)
    weights = trained_tlora(core, family, inventory)
    path = core.write.save_tlora(tmp_path / f"tiny_{family}.safetensors", weights, inventory=inventory)
    patch_keys = {f"diffusion_model.{m}.weight" for m in weights.adapters}

    # Both stock entry points: the loader function, and the node reading from the loras folder.
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(tmp_path)], folder_paths.supported_pt_extensions))
    with caplog.at_level(logging.WARNING):
        stock = comfy.sd.load_lora_for_models(
            tiny_model, None, comfy.utils.load_torch_file(str(path), safe_load=True), 1.0, 0)[0]
        node = nodes.LoraLoaderModelOnly().load_lora_model_only(tiny_model, path.name, 1.0)[0]
    assert stock_warnings(caplog) == []
    assert set(stock.patches) == set(node.patches) == patch_keys

    args, kwargs = model_inputs(family)
    base = dm(*args, **kwargs)
    state = core.masks.RankState()                      # no timesteps set: every rank active
    handles = core.apply.attach(dict(dm.named_modules()), weights.adapters, state, 1.0)
    try:
        ours = dm(*args, **kwargs)
    finally:
        core.apply.detach(handles)
    stock.patch_model()
    try:
        merged = stock.model.diffusion_model(*args, **kwargs)
    finally:
        stock.unpatch_model()
    assert torch.equal(dm(*args, **kwargs), base)       # both paths restored the model exactly

    scale = base.abs().max()
    effect, error = float((ours - base).abs().max()), float((merged - ours).abs().max())
    logging.getLogger(__name__).info("%s: adapter effect %.3g, stock vs ours %.3g, output scale %.3g",
                                     family, effect, error, float(scale))
    assert effect > 0.05 * scale                        # the adapters really change the output
    # float32: merging reassociates (W + UD) x vs W x + U (D x); each layer's result differs by a
    # few ulps (~1e-7 relative) and the tiny nets' ~10 adapted layers add them up. Measured
    # ~1e-6 of the output scale; 1e-4 leaves margin while staying far below the adapters' effect.
    torch.testing.assert_close(merged, ours, rtol=0, atol=1e-4 * float(scale))


@torch.no_grad()
def test_our_loader_reads_the_same_file_back_on_the_real_model(comfy, core, family, tiny_model, tmp_path):
    dm = tiny_model.model.diffusion_model
    inventory = core.inventory.inventory_from_module(dm)
    weights = trained_tlora(core, family, inventory)
    path = core.write.save_tlora(tmp_path / "t.safetensors", weights, inventory=inventory)
    loaded = core.read.load_tlora_file(path, inventory)
    assert loaded.warnings == [] and loaded.adapters.keys() == weights.adapters.keys()
    args, kwargs = model_inputs(family)
    outputs = []
    for w in (weights, loaded):
        state = core.masks.RankState()
        handles = core.apply.attach(dict(dm.named_modules()), w.adapters, state, 1.0)
        try:
            with state.at(torch.tensor([999.0, 10.0])):     # masked: per-sample ranks 2 and 3..4
                outputs.append(dm(*args, **kwargs))
        finally:
            core.apply.detach(handles)
    assert torch.equal(outputs[0], outputs[1])          # identical factors -> identical output


def test_real_size_inventories_are_recognised(comfy, core):
    from comfy_runtime import REAL_FLUX_CONFIG, REAL_SDXL_CONFIG

    sdxl = core.inventory.inventory_from_module(
        comfy.build_model("sdxl", REAL_SDXL_CONFIG, device="meta").diffusion_model)
    flux = core.inventory.inventory_from_module(
        comfy.build_model("flux", REAL_FLUX_CONFIG, device="meta").diffusion_model)
    assert core.check.detect_architecture(sdxl) == "sdxl"
    assert core.check.detect_architecture(flux) == "flux"
    assert len(adapted_layers("sdxl", sdxl)) == 560            # the reference code's SDXL targets
    assert flux["double_blocks.0.img_attn.qkv"] == (3 * 3072, 3072)
    assert flux["single_blocks.0.linear1"] == (3 * 3072 + 4 * 3072, 3072)
