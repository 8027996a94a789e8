"""diffusers / PEFT LoRA files: the scale ``lora_alpha / r`` of the PEFT LoraConfig they were saved with.

The expected deltas are written out from diffusers / PEFT's rule, independently of the reader:
``delta = lora_alpha / r * B @ A`` per module (``lora_alpha / sqrt(r)`` with use_rslora), ``r`` and
``lora_alpha`` from ``rank_pattern`` / ``alpha_pattern`` where a key matches the module's name (or
a dot-separated tail of it), else the config's. The config comes from the safetensors metadata
entry ``lora_adapter_metadata`` (unprefixed as ``save_lora_adapter`` writes it, or prefixed with
the component as a pipeline's ``save_lora_weights`` writes it), else from ``adapter_config.json``
in the file's folder (``PeftModel.save_pretrained``); with neither, scale 1 and a warning.
"""

from __future__ import annotations

import importlib
import json
import logging
import math

import pytest
import reference_files as rf
import torch
from safetensors.torch import load_file, save_file

from comfy_runtime import TINY_FLUX_CONFIG, TINY_SDXL_CONFIG
from tlora_core.files.check import TLoRAFileError
from tlora_core.files.names import ModuleIndex
from tlora_core.files.read import load_tlora_file

TINY_FLUX = rf.flux_inventory(TINY_FLUX_CONFIG)
TINY_SDXL = rf.sdxl_inventory(TINY_SDXL_CONFIG)
FLUX_LAYERS = {"transformer_blocks.0.attn.to_q": 8, "transformer_blocks.0.attn.add_k_proj": 8,
               "single_transformer_blocks.0.proj_out": 8}
SDXL_LAYERS = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 8,
               "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0": 8}


def peft_layers(inventory, ranks: dict[str, int], seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers name -> (lora_A (r, in), lora_B (out, r)) of the right shapes."""
    index, gen = ModuleIndex(inventory), torch.Generator().manual_seed(seed)
    out = {}
    for name, r in ranks.items():
        n, m = index.shape(index.resolve(name))
        out[name] = (torch.randn(r, m, generator=gen) / m ** 0.5, torch.randn(n, r, generator=gen) / r ** 0.5)
    return out


def write(path, layers: dict, prefix: str = "transformer.", config: dict | None = None,
          component: str | None = None, raw: str | None = None):
    """A PEFT-keyed safetensors file; ``config`` goes to ``lora_adapter_metadata`` (prefixed with
    ``component.`` as a pipeline writes it), ``raw`` replaces that entry's text."""
    sd = {}
    for name, (a, b) in layers.items():
        sd[f"{prefix}{name}.lora_A.weight"], sd[f"{prefix}{name}.lora_B.weight"] = a, b
    metadata = {"format": "pt"}
    if config is not None:
        blob = {f"{component}.{k}": v for k, v in config.items()} if component else config
        metadata["lora_adapter_metadata"] = json.dumps(blob, indent=2, sort_keys=True)
    if raw is not None:
        metadata["lora_adapter_metadata"] = raw
    save_file(sd, str(path), metadata=metadata)
    return path


def deltas(weights) -> dict[str, torch.Tensor]:
    """module -> its single adapter's ``up @ down`` (what is added at full rank)."""
    out = {}
    for module, group in weights.adapters.items():
        (adapter,) = group
        out[module] = adapter.up @ adapter.down
    return out


def expected(inventory, layers: dict, scales: dict[str, float]) -> dict[str, torch.Tensor]:
    index = ModuleIndex(inventory)
    return {index.resolve(name).module: scales[name] * b @ a for name, (a, b) in layers.items()}


@pytest.mark.parametrize("inventory, ranks, component", [
    (TINY_FLUX, FLUX_LAYERS, None),            # transformer.save_lora_adapter: fields unprefixed
    (TINY_FLUX, FLUX_LAYERS, "transformer"),   # FluxPipeline.save_lora_weights: "transformer.r", ...
    (TINY_SDXL, SDXL_LAYERS, "unet"),          # StableDiffusionXLPipeline: "unet.lora_alpha", ...
], ids=["model", "pipeline-flux", "pipeline-sdxl"])
def test_alpha_16_of_rank_8_gives_exactly_twice_the_delta_of_alpha_8(tmp_path, inventory, ranks, component):
    layers = peft_layers(inventory, ranks)
    prefix = "unet." if component == "unet" else "transformer."
    paths = {alpha: write(tmp_path / f"alpha{alpha}.safetensors", layers, prefix,
                          {"r": 8, "lora_alpha": alpha, "target_modules": sorted(ranks)}, component)
             for alpha in (8, 16)}
    loaded = {alpha: load_tlora_file(path, inventory) for alpha, path in paths.items()}
    d8, d16 = deltas(loaded[8]), deltas(loaded[16])
    assert d8.keys() == d16.keys() and len(d8) == len(ranks)
    for module in d8:
        assert torch.equal(d16[module], 2 * d8[module]), module      # x2 is exact in float
    want = expected(inventory, layers, dict.fromkeys(ranks, 1.0))
    for module, delta in d8.items():
        torch.testing.assert_close(delta, want[module], rtol=0, atol=1e-6)
    assert loaded[8].warnings == loaded[16].warnings == []


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_alpha_patterns_set_each_layers_scale(tmp_path, use_rslora):
    ranks = {"transformer_blocks.0.attn.to_q": 8, "transformer_blocks.0.attn.to_k": 4,
             "transformer_blocks.0.attn.add_k_proj": 8, "single_transformer_blocks.0.proj_mlp": 2}
    layers = peft_layers(TINY_FLUX, ranks, seed=1)
    config = {"r": 8, "lora_alpha": 16, "use_rslora": use_rslora,
              # "to_k" is a tail of ...attn.to_k only, not of ...attn.add_k_proj; "^..." as diffusers writes
              "rank_pattern": {"to_k": 4, "^single_transformer_blocks.0.proj_mlp": 2},
              "alpha_pattern": {"transformer_blocks.0.attn.to_k": 2, "proj_mlp": 6}}
    weights = load_tlora_file(write(tmp_path / "p.safetensors", layers, config=config), TINY_FLUX)
    r_alpha = {"transformer_blocks.0.attn.to_q": (8, 16), "transformer_blocks.0.attn.to_k": (4, 2),
               "transformer_blocks.0.attn.add_k_proj": (8, 16), "single_transformer_blocks.0.proj_mlp": (2, 6)}
    index = ModuleIndex(TINY_FLUX)
    by_rows = {(m, a.out_rows): a.up @ a.down for m, group in weights.adapters.items() for a in group}
    assert len(by_rows) == len(layers)
    for name, (r, alpha) in r_alpha.items():
        a, b = layers[name]
        target = index.resolve(name)      # to_q and to_k share the fused img qkv, on their own rows
        scale = alpha / (math.sqrt(r) if use_rslora else r)
        torch.testing.assert_close(by_rows[(target.module, target.out_rows)], scale * b @ a,
                                   rtol=0, atol=1e-6, msg=name)


def test_adapter_config_json_beside_the_weights_is_read(tmp_path):
    layers = peft_layers(TINY_FLUX, FLUX_LAYERS, seed=2)
    folder = tmp_path / "my_lora"           # PeftModel.save_pretrained: weights + adapter_config.json
    folder.mkdir()
    path = write(folder / "adapter_model.safetensors", layers, prefix="base_model.model.")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["to_q", "add_k_proj", "proj_out"]}))
    weights = load_tlora_file(path, TINY_FLUX)
    want = expected(TINY_FLUX, layers, dict.fromkeys(FLUX_LAYERS, 2.0))
    for module, delta in deltas(weights).items():
        torch.testing.assert_close(delta, want[module], rtol=0, atol=1e-6)
    assert weights.warnings == []
    # the file's own metadata wins over a config beside it
    own = write(folder / "with_metadata.safetensors", layers, config={"r": 8, "lora_alpha": 4})
    want = expected(TINY_FLUX, layers, dict.fromkeys(FLUX_LAYERS, 0.5))
    for module, delta in deltas(load_tlora_file(own, TINY_FLUX)).items():
        torch.testing.assert_close(delta, want[module], rtol=0, atol=1e-6)


def test_an_alpha_tensor_wins_over_the_config(tmp_path):
    layers = peft_layers(TINY_FLUX, {"transformer_blocks.0.attn.to_q": 8}, seed=3)
    path = write(tmp_path / "a.safetensors", layers, config={"r": 8, "lora_alpha": 16})
    sd = load_file(str(path))
    sd["transformer.transformer_blocks.0.attn.to_q.alpha"] = torch.tensor(4.0)   # as ComfyUI reads it
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps({"r": 8, "lora_alpha": 16})})
    (delta,) = deltas(load_tlora_file(path, TINY_FLUX)).values()
    ((a, b),) = layers.values()
    torch.testing.assert_close(delta, 0.5 * b @ a, rtol=0, atol=1e-6)


def test_unknown_scale_is_one_and_said_so(tmp_path):
    layers = peft_layers(TINY_FLUX, FLUX_LAYERS, seed=4)
    weights = load_tlora_file(write(tmp_path / "no_alpha.safetensors", layers), TINY_FLUX)
    want = expected(TINY_FLUX, layers, dict.fromkeys(FLUX_LAYERS, 1.0))
    for module, delta in deltas(weights).items():
        torch.testing.assert_close(delta, want[module], rtol=0, atol=1e-6)
    (warning,) = weights.warnings
    assert "no_alpha.safetensors" in warning and "scale 1" in warning and "3 layer(s)" in warning


@pytest.mark.comfy
def test_loader_logs_the_unknown_scale_warning(comfy, pack, loras_dir, caplog):
    loader = importlib.import_module(f"{pack.__name__}.nodes.loader")
    write(loras_dir / "unknown_scale.safetensors", peft_layers(TINY_FLUX, FLUX_LAYERS, seed=5))
    with caplog.at_level(logging.WARNING):
        loader.TLoRALoader.execute(comfy.build_model("flux"), "unknown_scale.safetensors", 1.0, -1, 0.0,
                                   False)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("unknown_scale.safetensors" in m and "scale 1 (lora_alpha = r) is assumed" in m
               for m in messages), messages


@pytest.mark.parametrize("raw, needles", [
    ("{r: 8, lora_alpha: 16", ("not valid JSON",)),
    ("[8, 16]", ("not a JSON object",)),
    (json.dumps({"r": 8, "lora_alpha": "sixteen"}), ("'lora_alpha' must be a finite number",)),
    (json.dumps({"r": 0, "lora_alpha": 16}), ("'r' must be a whole number",)),
    (json.dumps({"r": 8, "lora_alpha": 16, "rank_pattern": {"to_(q": 4}}), ("rank_pattern", "to_(q")),
])
def test_malformed_metadata_names_the_file_and_the_key(tmp_path, raw, needles):
    path = write(tmp_path / "broken.safetensors", peft_layers(TINY_FLUX, FLUX_LAYERS), raw=raw)
    with pytest.raises(TLoRAFileError) as err:
        load_tlora_file(path, TINY_FLUX)
    for needle in ("broken.safetensors", "metadata entry 'lora_adapter_metadata'", *needles):
        assert needle in str(err.value)


def test_malformed_adapter_config_json_names_that_file(tmp_path):
    path = write(tmp_path / "adapter_model.safetensors", peft_layers(TINY_FLUX, FLUX_LAYERS))
    (tmp_path / "adapter_config.json").write_text('{"r": 8, "lora_alpha": ')
    with pytest.raises(TLoRAFileError, match=r"adapter_config\.json: cannot be read as JSON"):
        load_tlora_file(path, TINY_FLUX)


def test_a_config_for_other_ranks_or_dora_is_refused(tmp_path):
    layers = peft_layers(TINY_FLUX, FLUX_LAYERS)
    path = write(tmp_path / "r16.safetensors", layers, config={"r": 16, "lora_alpha": 16})
    with pytest.raises(TLoRAFileError, match=r"r16\.safetensors: layer '.+' has rank 8, but its metadata "
                                             r"entry 'lora_adapter_metadata' gives it r = 16"):
        load_tlora_file(path, TINY_FLUX)
    path = write(tmp_path / "dora.safetensors", layers, config={"r": 8, "lora_alpha": 8, "use_dora": True})
    with pytest.raises(TLoRAFileError, match="use_dora"):
        load_tlora_file(path, TINY_FLUX)
