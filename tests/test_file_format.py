"""The T-LoRA file: round trips of every variant, the stored full-rank pair, metadata, atomic write."""

from __future__ import annotations

import json
import os

import pytest
import torch
from file_format_helpers import (
    FLUX_INV,
    INVENTORIES,
    SDXL_INV,
    make_adapter,
    make_weights,
    module_delta,
    read_raw,
)
from safetensors.torch import save_file

import tlora_core.adapter
import tlora_core.schedule
import tlora_core.weights
from tlora_core.adapter import RankSchedule
from tlora_core.files import write
from tlora_core.files.read import load_tlora_file
from tlora_core.files.write import save_tlora
from tlora_core.weights import TLoRAWeights

core = tlora_core
VARIANTS = ["tlora", "vanilla", "ortho", "lora"]
TIMESTEPS = [None, 1, 500, 999]      # None: outside sampling = every rank (= t 0)


def assert_same_adapters(a: TLoRAWeights, b: TLoRAWeights) -> None:
    assert a.adapters.keys() == b.adapters.keys()
    for module in a.adapters:
        for x, y in zip(a.adapters[module], b.adapters[module], strict=True):
            assert torch.equal(x.down, y.down) and torch.equal(x.up, y.up), module
            assert torch.equal(x.rank_index, y.rank_index), module
            assert (x.parts, x.out_rows, x.schedule) == (y.parts, y.out_rows, y.schedule), module


@pytest.mark.parametrize("architecture", ["sdxl", "flux"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_gives_the_same_adapters_and_deltas_at_every_mask(tmp_path, variant, architecture):
    weights = make_weights(core, variant, architecture, rank=4, min_rank=2, power=1.5)
    inventory = INVENTORIES[architecture]
    path = save_tlora(tmp_path / "a.safetensors", weights, inventory=inventory)
    loaded = load_tlora_file(path, inventory)
    assert (loaded.variant, loaded.architecture, loaded.schedule) == \
        (variant, architecture, weights.schedule)
    assert loaded.source_format == "tlora" and loaded.warnings == []
    assert_same_adapters(weights, loaded)
    x = torch.randn(2, 3, 128)
    for module, group in weights.adapters.items():
        out, inp = inventory[module]
        for t in TIMESTEPS:
            torch.testing.assert_close(module_delta(core, loaded.adapters[module], x[..., :inp], out, t),
                                       module_delta(core, group, x[..., :inp], out, t), rtol=0, atol=0)


@pytest.mark.parametrize("architecture", ["sdxl", "flux"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_stored_pair_is_the_full_rank_delta_with_scale_one(tmp_path, variant, architecture):
    weights = make_weights(core, variant, architecture, seed=3)
    inventory = INVENTORIES[architecture]
    sd, _ = read_raw(save_tlora(tmp_path / "a.safetensors", weights, inventory=inventory))
    assert len(sd) == 3 * len(weights.adapters)
    for module, group in weights.adapters.items():
        key = "lora_unet_" + module.replace(".", "_")
        down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
        assert down.dtype == up.dtype == torch.float32
        assert up.shape[0] == inventory[module][0] and down.shape[1] == inventory[module][1]
        assert float(sd[f"{key}.alpha"]) == down.shape[0]          # stock scale alpha / k = 1
        ours = torch.zeros(inventory[module], dtype=torch.float64)
        for a in group:                 # full rank: every part's columns active, parts summed
            rows = slice(None) if a.out_rows is None else slice(*a.out_rows)
            ours[rows] += a.up.double() @ a.down.double()
        # Double-precision products of the same float32 factors: only summation order differs.
        torch.testing.assert_close(up.double() @ down.double(), ours, rtol=1e-12, atol=1e-12)


def test_ortho_pair_holds_trained_and_negated_frozen_factors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    adapter = make_adapter(core, "tlora", 32, 32, 4, 2, gen=gen)
    module = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    weights = TLoRAWeights({module: [adapter]}, "sdxl", "tlora", RankSchedule(4, 2), "tlora")
    sd, meta = read_raw(save_tlora(tmp_path / "o.safetensors", weights))
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    # up = [B S | -B_init S_init], down = [A; A_init]: columns 4..7 are the frozen init, negated.
    assert torch.equal(sd[f"{key}.lora_down.weight"], adapter.down)
    assert torch.equal(sd[f"{key}.lora_up.weight"], adapter.up)
    assert (meta["tlora.parts"], meta["tlora.rank"], meta["tlora.min_rank"]) == ("2", "4", "2")


def test_fused_layers_are_block_diagonal_and_only_irregular_ones_store_a_layout(tmp_path):
    weights = make_weights(core, "tlora", "flux", rank=4)
    sd, meta = read_raw(save_tlora(tmp_path / "f.safetensors", weights, inventory=FLUX_INV))
    up = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.shape == (48, 24)                                 # 3 adapters x (2 parts x rank 4)
    for i in range(3):
        rows, cols = slice(16 * i, 16 * (i + 1)), slice(8 * i, 8 * (i + 1))
        assert up[rows, cols].abs().sum() > 0
        off = up[rows].clone()
        off[:, cols] = 0
        assert not off.any()                                    # zero outside the adapter's block
    linear1 = sd["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert linear1.shape == (112, 24) and not linear1[48:].any()  # mlp rows untouched
    # qkv splits evenly (derivable from the shapes); linear1's q/k/v rows do not.
    assert set(json.loads(meta["tlora.layout"])) == {"single_blocks.0.linear1"}
    sd_sdxl, meta_sdxl = read_raw(save_tlora(tmp_path / "s.safetensors",
                                             make_weights(core, "tlora", "sdxl"), inventory=SDXL_INV))
    assert "tlora.layout" not in meta_sdxl


def test_per_layer_ranks_and_unusual_grouping_round_trip_through_an_explicit_layout(tmp_path):
    gen = torch.Generator().manual_seed(1)
    a = make_adapter(core, "lora", 32, 32, 3, 1, gen=gen)
    b = make_adapter(core, "lora", 32, 24, 6, 1, gen=gen)
    a.schedule, b.schedule = RankSchedule(3, 2), RankSchedule(6, 2)   # re-factored LoRA: rank per layer
    b.rank_index = torch.tensor([5, 4, 3, 2, 1, 0])                   # any column -> rank map
    c = make_adapter(core, "lora", 32, 32, 6, 1, gen=gen)             # unscheduled layer
    weights = TLoRAWeights({"input_blocks.4.1.transformer_blocks.0.attn1.to_q": [a],
                            "input_blocks.4.1.transformer_blocks.0.attn2.to_k": [b],
                            "input_blocks.4.1.transformer_blocks.0.attn2.to_q": [c]},
                           "sdxl", "lora", RankSchedule(6, 2), "lora")
    path = save_tlora(tmp_path / "r.safetensors", weights)
    loaded = load_tlora_file(path, SDXL_INV)
    assert_same_adapters(weights, loaded)
    assert read_raw(path)[1]["tlora.source_format"] == "lora"


def test_bf16_file_loads_as_float32_within_bf16_rounding(tmp_path):
    weights = make_weights(core, "tlora", "flux")
    path = save_tlora(tmp_path / "h.safetensors", weights, dtype=torch.bfloat16, inventory=FLUX_INV)
    sd, _ = read_raw(path)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    assert sd[f"{key}.lora_up.weight"].dtype == torch.bfloat16
    assert sd[f"{key}.alpha"].dtype == torch.float32
    loaded = load_tlora_file(path, FLUX_INV)
    for module, group in weights.adapters.items():
        for x, y in zip(group, loaded.adapters[module], strict=True):
            assert y.down.dtype == torch.float32
            # bf16 keeps 8 significant bits: relative rounding error <= 2^-8 per entry.
            torch.testing.assert_close(y.up, x.up, rtol=2 ** -8, atol=0)


def test_metadata_is_all_strings_with_modelspec_kohya_and_schedule_keys(tmp_path):
    weights = make_weights(core, "tlora", "sdxl", rank=4, min_rank=2, power=2.0)
    training = {"steps": 800, "lr": 1e-4, "optimizer": "AdamW"}
    path = save_tlora(tmp_path / "dog.safetensors", weights, extra_metadata={
        "tlora.trigger": "sks dog", "tlora.prompt": "a photo of sks dog",
        "tlora.training": json.dumps(training)})
    _, meta = read_raw(path)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    expected = {"tlora.format_version": "1", "tlora.variant": "tlora", "tlora.rank": "4",
                "tlora.min_rank": "2", "tlora.power": "2.0", "tlora.T": "1000", "tlora.parts": "2",
                "tlora.architecture": "sdxl", "tlora.trigger": "sks dog",
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                "modelspec.title": "dog", "modelspec.trigger_phrase": "sks dog",
                "ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": "8",
                "ss_network_alpha": "8"}
    assert {k: meta.get(k) for k in expected} == expected
    assert json.loads(meta["tlora.training"]) == training
    assert meta["modelspec.date"][:2] == "20" and "T-LoRA" in meta["ss_training_comment"]
    flux_meta = read_raw(save_tlora(tmp_path / "f.safetensors", make_weights(core, "ortho", "flux"),
                                    inventory=FLUX_INV))[1]
    assert flux_meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert "tlora.min_rank" not in flux_meta and flux_meta["tlora.variant"] == "ortho"


@pytest.mark.parametrize("extra,needle", [({"tlora.rank": "8"}, "written by save_tlora"),
                                          ({"tlora.trigger": 5}, "strings"),
                                          ({"tlora.training": "{not json"}, "JSON")])
def test_bad_extra_metadata_is_refused_before_writing(tmp_path, extra, needle):
    with pytest.raises(ValueError, match=needle):
        save_tlora(tmp_path / "x.safetensors", make_weights(core, "tlora", "sdxl"), extra_metadata=extra)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_inconsistent_or_non_finite_weights(tmp_path):
    weights = make_weights(core, "tlora", "sdxl")
    with pytest.raises(ValueError, match="needs a rank schedule"):
        save_tlora(tmp_path / "x.safetensors", TLoRAWeights(weights.adapters, "sdxl", "tlora", None, "tlora"))
    weights.adapters["label_emb.0.0"][0].up[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        save_tlora(tmp_path / "x.safetensors", weights)
    fused = make_weights(core, "tlora", "flux")
    with pytest.raises(ValueError, match="pass inventory="):
        save_tlora(tmp_path / "x.safetensors", fused)              # linear1's width is unknowable
    assert list(tmp_path.iterdir()) == []


def test_caller_min_rank_and_power_override_the_files(tmp_path):
    path = save_tlora(tmp_path / "a.safetensors", make_weights(core, "tlora", "sdxl", rank=8, min_rank=4),
                      inventory=SDXL_INV)
    loaded = load_tlora_file(path, SDXL_INV, min_rank=2, power=0.5)
    assert loaded.schedule == RankSchedule(8, 2, 0.5)
    assert {a.schedule for g in loaded.adapters.values() for a in g} == {RankSchedule(8, 2, 0.5)}
    assert load_tlora_file(path, SDXL_INV, min_rank=0.25).schedule == RankSchedule(8, 2)   # fraction
    assert load_tlora_file(path, SDXL_INV, min_rank=99).schedule == RankSchedule(8, 8)     # capped
    with pytest.raises(ValueError, match="min_rank"):
        load_tlora_file(path, SDXL_INV, min_rank=0)
    with pytest.raises(ValueError, match="min_rank"):
        load_tlora_file(path, SDXL_INV, min_rank=2.5)
    with pytest.raises(ValueError, match="power"):
        load_tlora_file(path, SDXL_INV, power=-1.0)


def test_loaded_adapters_share_one_rank_index_per_layout(tmp_path):
    path = save_tlora(tmp_path / "a.safetensors", make_weights(core, "tlora", "sdxl"), inventory=SDXL_INV)
    loaded = load_tlora_file(path, SDXL_INV)
    # One tensor object -> one mask per model call for all layers (masks.RankState caches by it).
    assert len({a.layout_key() for g in loaded.adapters.values() for a in g}) == 1


def _failing_save(fail_with):
    def fake_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise fail_with
    return fake_save_file


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_neither_target_nor_temp_file(tmp_path, monkeypatch, error):
    monkeypatch.setattr(write, "save_file", _failing_save(error))
    with pytest.raises(type(error)):
        save_tlora(tmp_path / "a.safetensors", make_weights(core, "tlora", "sdxl"))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_overwrite_keeps_the_previous_file_intact(tmp_path, monkeypatch):
    path = save_tlora(tmp_path / "a.safetensors", make_weights(core, "tlora", "sdxl"))
    before = path.read_bytes()
    monkeypatch.setattr(write, "save_file", _failing_save(OSError("disk full")))
    with pytest.raises(OSError):
        save_tlora(path, make_weights(core, "vanilla", "sdxl"))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_successful_write_leaves_only_the_target_with_the_usual_file_mode(tmp_path):
    reference = tmp_path / "reference"
    reference.touch()
    path = save_tlora(tmp_path / "sub" / "a.safetensors", make_weights(core, "tlora", "sdxl"))
    assert [p.name for p in path.parent.iterdir()] == ["a.safetensors"]
    # safetensors alone writes 0600; the file must get the mode any new file gets here.
    assert os.stat(path).st_mode & 0o777 == os.stat(reference).st_mode & 0o777


def test_other_formats_are_dispatched_to_their_readers(tmp_path):
    weights = make_weights(core, "lora", "flux", rank=4)
    path = save_tlora(tmp_path / "plain.safetensors", weights, inventory=FLUX_INV)
    assert load_tlora_file(path, FLUX_INV).source_format == "tlora"
    # rank_refactor: an unscheduled LoRA of ours is re-factored by the plain-LoRA reader.
    refactored = load_tlora_file(path, FLUX_INV, rank_refactor=True, min_rank=2)
    assert refactored.source_format == "lora" and refactored.schedule is not None
    # The same tensors without our metadata are an ordinary kohya LoRA with the same delta.
    sd, meta = read_raw(path)
    stripped = tmp_path / "stripped.safetensors"
    save_file(sd, str(stripped), metadata={"ss_network_dim": meta["ss_network_dim"]})
    plain = load_tlora_file(stripped, FLUX_INV)
    assert plain.source_format == "lora" and plain.metadata == {"ss_network_dim": meta["ss_network_dim"]}
    x = torch.randn(3, 80)
    for module, group in weights.adapters.items():
        out, inp = FLUX_INV[module]
        # Same float32 factors, summed in another order (one block-diagonal pair vs three).
        torch.testing.assert_close(module_delta(core, plain.adapters[module], x[:, :inp], out, None),
                                   module_delta(core, group, x[:, :inp], out, None),
                                   rtol=1e-5, atol=1e-5)
