"""FLUX LoRA spellings that newer ComfyUI knows, read by the T-LoRA Loader as that ComfyUI reads them.

ComfyUI 0.33 added aliases to ``comfy.utils.flux_to_diffusers`` (0.38.1 has the same set): the
double blocks' ``ff.linear_in/out`` and ``ff_context.linear_in/out`` (= ``img_mlp.0/2`` and
``txt_mlp.0/2``) and the single blocks' ``attn.to_qkv_mlp_proj`` (all rows of the fused
``linear1``: q | k | v | mlp) and ``attn.to_out`` (``linear2``). On each runtime's tiny FLUX, a file
with only these spellings (diffusers / PEFT ``transformer.``, OneTrainer ``lora_transformer_`` and
LyCORIS ``lycoris_`` keys) is checked for

(a) every layer landing on the module and output rows that the runtime's own
    ``comfy.lora.model_lora_keys_unet`` maps it to, and
(b) the T-LoRA Loader's patched model giving the stock loader's output (an ordinary LoRA is never
    masked, so full rank) at every model call of a sampling run.

A runtime whose key map lacks these spellings (0.3.75 predates them: its stock loader logs
"lora key not loaded" and drops the layers) is compared on the spelling it does map to the same
weight: the older diffusers name, or ComfyUI's own path for all of ``linear1``.
"""

from __future__ import annotations

import importlib
import logging
from types import SimpleNamespace

import loader_fixtures as lf
import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.comfy

RANK = 4
REL_TOL = 2e-5          # as test_loader_patch.py: merged weight vs forward-pass adapter, float32
STOCK_WARNINGS = ("lora key not loaded", "NOT LOADED")
# (prefix, separator inside the name, down suffix, up suffix) of each file style
STYLES = {
    "peft": ("transformer.", ".", ".lora_A.weight", ".lora_B.weight"),
    "onetrainer": ("lora_transformer_", "_", ".lora_down.weight", ".lora_up.weight"),
    "lycoris": ("lycoris_", "_", ".lora_down.weight", ".lora_up.weight"),
}
# New spelling -> the diffusers spelling ComfyUI maps to the same weight since before 0.33
# (None: no diffusers name covers all of linear1; ComfyUI's own path does).
DOUBLE_ALIASES = {"ff.linear_in": "ff.net.0.proj", "ff.linear_out": "ff.net.2",
                  "ff_context.linear_in": "ff_context.net.0.proj",
                  "ff_context.linear_out": "ff_context.net.2"}
SINGLE_ALIASES = {"attn.to_qkv_mlp_proj": None, "attn.to_out": "proj_out"}


@pytest.fixture(scope="module")
def core(pack):
    names = ("files.read", "files.names", "inventory")
    return SimpleNamespace(**{n.split(".")[-1]: importlib.import_module(f"{pack.__name__}.tlora_core.{n}")
                              for n in names})


def aliases(config: dict) -> dict[str, str]:
    """Every new spelling of the model -> the older key spelling (without style) of its weight."""
    out = {}
    for i in range(config["depth"]):
        out.update({f"transformer_blocks.{i}.{new}": f"transformer_blocks.{i}.{old}"
                    for new, old in DOUBLE_ALIASES.items()})
    for i in range(config["depth_single_blocks"]):
        out.update({f"single_transformer_blocks.{i}.{new}":
                    f"single_transformer_blocks.{i}.{old}" if old else f"single_blocks.{i}.linear1"
                    for new, old in SINGLE_ALIASES.items()})
    return out


def layer_key(name: str, style: str) -> str:
    """The file's layer key (without the down / up suffix) of a diffusers name in ``style``."""
    if name.startswith("single_blocks."):            # ComfyUI's own path, the same in every style
        return f"diffusion_model.{name}"
    prefix, sep, _, _ = STYLES[style]
    return prefix + name.replace(".", sep)


def stock_target(to) -> tuple[str, tuple[int, int] | None]:
    """(module, rows) of a ``model_lora_keys_unet`` value: a weight key or (key, (dim, start, size))."""
    if isinstance(to, tuple):
        key, rows = to[0], None if to[1] is None else (to[1][1], to[1][1] + to[1][2])
    else:
        key, rows = to, None
    return key.removeprefix("diffusion_model.").removesuffix(".weight"), rows


def stock_spellings(key_map: dict, config: dict, style: str) -> dict[str, str]:
    """New spelling -> the layer key this runtime's stock loader maps for that weight."""
    out = {}
    for new, old in aliases(config).items():
        key = layer_key(new, style)
        # Feature detection: a runtime that maps the new spelling is compared on it; one that
        # does not (ComfyUI 0.3.75) would drop it, so it is compared on the older spelling.
        out[new] = key if key in key_map else layer_key(old, style)
    known = {out[new] == layer_key(new, style) for new in out}
    assert len(known) == 1, f"the runtime maps only some of the new spellings: {out}"
    return out


def random_layers(inventory: dict, targets: dict, seed: int = 5) -> dict[str, tuple]:
    """name -> (down, up, alpha) for the (module, rows) each name targets."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (module, rows) in targets.items():
        out_f, in_f = inventory[module]
        out_f = out_f if rows is None else rows[1] - rows[0]
        down = torch.randn(RANK, in_f, generator=gen) / in_f ** 0.5
        up = 0.3 * torch.randn(out_f, RANK, generator=gen) / RANK ** 0.5
        layers[name] = (down, up, RANK / 2)        # alpha / rank = 0.5 for both loaders
    return layers


def state_dict(layers: dict, style: str, spelling) -> dict[str, torch.Tensor]:
    _, _, d, u = STYLES[style]
    sd = {}
    for name, (down, up, alpha) in layers.items():
        key = spelling(name)
        sd[key + d], sd[key + u], sd[key + ".alpha"] = down, up, torch.tensor(float(alpha))
    return sd


def setup(runtime, core, style: str):
    """(base model, inventory, the runtime's key map, name -> stock key, name -> stock target)."""
    import comfy.lora as comfy_lora

    base = runtime.build_model("flux")
    inventory = core.inventory.inventory_from_module(base.model.diffusion_model)
    key_map = comfy_lora.model_lora_keys_unet(base.model, {})
    spellings = stock_spellings(key_map, runtime.TINY_FLUX_CONFIG, style)
    targets = {name: stock_target(key_map[key]) for name, key in spellings.items()}
    return base, inventory, key_map, spellings, targets


@pytest.mark.parametrize("style", STYLES)
def test_new_flux_spellings_land_where_the_runtime_maps_them(comfy, core, style, tmp_path):
    base, inventory, key_map, spellings, targets = setup(comfy, core, style)
    logging.getLogger(__name__).info("stock spellings on this runtime: %s", spellings)
    assert len(targets) == 6 and all(module in inventory for module, _ in targets.values())

    index = core.names.ModuleIndex(inventory)
    for name, (module, rows) in targets.items():
        layer = core.names.strip_prefix(layer_key(name, style))[0]
        assert index.resolve(layer) == core.inventory.Target(module, rows), name

    layers = random_layers(inventory, targets)
    path = tmp_path / f"aliases_{style}.safetensors"
    save_file(state_dict(layers, style, lambda name: layer_key(name, style)), str(path))
    weights = core.read.load_tlora_file(path, inventory)
    assert weights.warnings == []                       # no layer lost, nothing unmatched
    got = {module: [a.out_rows for a in group] for module, group in weights.adapters.items()}
    assert got == {module: [rows] for module, rows in targets.values()}
    for name, (down, up, _) in layers.items():
        (adapter,) = weights.adapters[targets[name][0]]
        torch.testing.assert_close(adapter.up @ adapter.down, 0.5 * up @ down, rtol=0, atol=1e-6)


def run(model, record_into: list) -> None:
    """Sample the tiny FLUX with cond and uncond in one batch, recording every model call."""
    clone = model.clone()
    lf.install_recorder(clone, record_into)
    lf.comfy_runtime.sample(clone, "flux", steps=4, cfg=2.0, size=16)


@pytest.mark.parametrize("style", ["peft", "onetrainer"])
def test_loader_equals_the_stock_loader_on_new_flux_spellings(comfy, pack, core, loras_dir, style,
                                                              caplog):
    import comfy.sd as comfy_sd

    loader = importlib.import_module(f"{pack.__name__}.nodes.loader")
    base, inventory, _, spellings, targets = setup(comfy, core, style)
    layers = random_layers(inventory, targets, seed=6)
    save_file(state_dict(layers, style, lambda name: layer_key(name, style)),
              str(loras_dir / "aliases.safetensors"))
    ours = loader.TLoRALoader.execute(base, "aliases.safetensors", 0.8, -1, 0.0, False).result[0]

    # The stock loader gets the same tensors under the spelling this runtime maps (the same file
    # where it knows the new spellings).
    with caplog.at_level(logging.WARNING):
        stock = comfy_sd.load_lora_for_models(
            base, None, state_dict(layers, style, spellings.__getitem__), 0.8, 0)[0]
    assert [r for r in caplog.records if r.getMessage().startswith(STOCK_WARNINGS)] == []
    assert set(stock.patches) == {f"diffusion_model.{m}.weight" for m, _ in targets.values()}

    got, want, plain = [], [], []
    for model, record in ((ours, got), (stock, want), (base, plain)):
        run(model, record)
    assert len(got) == len(want) > 0
    scale = max(out.abs().max().item() for _, out in want)
    for (s_got, a), (s_want, b) in zip(got, want, strict=True):
        assert torch.equal(s_got, s_want)
        torch.testing.assert_close(a, b, rtol=0, atol=REL_TOL * scale)
    effect = max((a - b).abs().max().item() for (_, a), (_, b) in zip(got, plain, strict=True))
    assert effect > 20 * REL_TOL * scale                 # the LoRA really changes every output
