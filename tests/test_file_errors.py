"""Bad files get a TLoRAFileError naming the file and the fix; partial matches warn with counts."""

from __future__ import annotations

import collections
import json
import logging

import pytest
import torch
from file_format_helpers import FLUX_INV, SDXL_INV, make_weights, read_raw, rewrite
from safetensors.torch import save_file

import tlora_core.adapter
import tlora_core.schedule
import tlora_core.weights
from tlora_core.files.check import TLoRAFileError, detect_architecture
from tlora_core.files.describe import guess_file_architecture
from tlora_core.files.foreign import detect_format
from tlora_core.files.read import load_tlora_file
from tlora_core.files.write import save_tlora
from tlora_core.inventory import inventory_from_module

core = tlora_core
QKV = "lora_unet_double_blocks_0_img_attn_qkv"
TO_Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


class NotATensor:
    """A class weights_only unpickling must refuse."""


@pytest.fixture
def sdxl_file(tmp_path):
    return save_tlora(tmp_path / "dog.safetensors", make_weights(core, "tlora", "sdxl"), inventory=SDXL_INV)


@pytest.fixture
def flux_file(tmp_path):
    return save_tlora(tmp_path / "cat.safetensors", make_weights(core, "tlora", "flux"), inventory=FLUX_INV)


def expect_error(path, inventory, *needles, **kwargs) -> str:
    with pytest.raises(TLoRAFileError) as info:
        load_tlora_file(path, inventory, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and path.name in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_text_file_is_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, this is not a tensor file")
    expect_error(path, SDXL_INV, "not a valid safetensors file")


def test_pickle_with_a_safetensors_name_is_refused(tmp_path):
    path = tmp_path / "sneaky.safetensors"
    torch.save({"a": torch.zeros(2)}, path)
    expect_error(path, SDXL_INV, "looks like a PyTorch pickle")


def test_unsafe_pickle_is_refused_without_running_it(tmp_path):
    path = tmp_path / "lora.pt"
    torch.save({"a": NotATensor()}, path)
    expect_error(path, SDXL_INV, "refused", "could run code")


@pytest.mark.parametrize("payload,needle", [({"a": torch.zeros(1), "b": "text"}, "'b' is a str"),
                                            ({"a": {"nested": torch.zeros(1)}}, "'a' is a dict"),
                                            ([torch.zeros(1)], "holds a list")])
def test_pickle_that_is_not_a_flat_dict_of_tensors_is_refused(tmp_path, payload, needle):
    path = tmp_path / "lora.pth"
    torch.save(payload, path)
    expect_error(path, SDXL_INV, needle)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_files_are_reported_as_corrupt(tmp_path, sdxl_file, suffix):
    path = tmp_path / f"cut{suffix}"
    if suffix == ".pt":
        torch.save(read_raw(sdxl_file)[0], path)
    else:
        path.write_bytes(sdxl_file.read_bytes())
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    expect_error(path, SDXL_INV, "corrupt", "truncated")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "gone.safetensors", SDXL_INV, "no such file")


def test_tensors_only_pickle_reaches_format_detection(tmp_path):
    path = tmp_path / "weights.bin"
    torch.save({"something.else": torch.zeros(3)}, path)
    expect_error(path, SDXL_INV, "not a LoRA or T-LoRA file this loader knows", "'something.else'")


def test_file_for_another_architecture_names_both_and_lists_keys(sdxl_file):
    message = expect_error(sdxl_file, FLUX_INV, "made for SDXL", "the model is FLUX", "lora_unet_input_blocks_4_1")
    assert "Load it on the model it was trained for" in message


def test_architecture_is_guessed_from_the_written_key_names_alone(flux_file, sdxl_file):
    assert guess_file_architecture(read_raw(flux_file)[0].keys()) == "flux"
    assert guess_file_architecture(read_raw(sdxl_file)[0].keys()) == "sdxl"
    expect_error(flux_file, SDXL_INV, "made for FLUX", "the model is SDXL", QKV)


def test_partial_match_warns_with_counts_and_records_it(sdxl_file, caplog):
    inventory = dict(SDXL_INV)
    del inventory["label_emb.0.0"], inventory["input_blocks.4.1.transformer_blocks.0.ff.net.2"]
    with caplog.at_level(logging.WARNING):
        loaded = load_tlora_file(sdxl_file, inventory)
    assert len(loaded.adapters) == len(SDXL_INV) - 2
    assert len(loaded.warnings) == 1 and "2 of 10 entries" in loaded.warnings[0]
    assert "dog.safetensors" in loaded.warnings[0] and "the other 8 layers are applied" in loaded.warnings[0]
    assert any("2 of 10 entries" in r.getMessage() for r in caplog.records)


def test_shape_mismatch_names_layer_expected_and_found(sdxl_file):
    inventory = dict(SDXL_INV)
    inventory["input_blocks.4.1.transformer_blocks.0.attn2.to_k"] = (32, 2048)
    expect_error(sdxl_file, inventory, "layer 'input_blocks.4.1.transformer_blocks.0.attn2.to_k'",
                 "expects (out=32, in=2048)", "down (8, 24)")


def test_fused_rows_beyond_the_layer_are_a_shape_mismatch(flux_file):
    inventory = dict(FLUX_INV)
    inventory["single_blocks.0.linear1"] = (40, 16)        # layout says rows up to 48
    expect_error(flux_file, inventory, "single_blocks.0.linear1")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_tensor_names_the_key(sdxl_file, bad):
    up = read_raw(sdxl_file)[0][f"{TO_Q}.lora_up.weight"].clone()
    up[3, 1] = bad
    rewrite(sdxl_file, tensors={f"{TO_Q}.lora_up.weight": up})
    expect_error(sdxl_file, SDXL_INV, f"'{TO_Q}.lora_up.weight'", "NaN/Inf", "1 NaN/Inf value(s)")


@pytest.mark.parametrize("edit,needles", [
    ({"tlora.min_rank": "9"}, ["inconsistent T-LoRA metadata", "'tlora.min_rank' = 9 must be between 1 and 'tlora.rank' = 4"]),
    ({"tlora.variant": "dora"}, ["unknown variant 'dora'"]),
    ({"tlora.format_version": "2"}, ["format version 2 is not known", "Update the pack"]),
    ({"tlora.rank": "3"}, ["8 columns do not match rank 3 x 2 part(s)"]),
    ({"tlora.rank": "four"}, ["'tlora.rank' = 'four' is not a whole number"]),
    ({"tlora.power": "-1"}, ["'tlora.power' = '-1' must be a finite number > 0"]),
    ({"tlora.min_rank": None}, ["variant 'tlora' needs a schedule"]),
    ({"tlora.architecture": "no-such-family"}, ["unknown architecture 'no-such-family'"]),
    ({"tlora.layout": "{oops"}, ["tlora.layout is not valid JSON"]),
    ({"tlora.layout": json.dumps({"label_emb.0.0": [{"rows": None, "columns": 6, "parts": 2}]})},
     ["the layout has 6 columns, the tensors 8"]),
    ({"tlora.layout": json.dumps({"no.such.layer": [{"rows": None, "columns": 8, "parts": 2}]})},
     ["layout names layers with no tensors"]),
])
def test_inconsistent_metadata_is_refused(sdxl_file, edit, needles):
    rewrite(sdxl_file, metadata=edit, drop=[k for k, v in edit.items() if v is None])
    expect_error(sdxl_file, SDXL_INV, *needles)


def test_incomplete_pair_and_edited_off_block_weights_are_refused(flux_file, sdxl_file):
    up = read_raw(flux_file)[0][f"{QKV}.lora_up.weight"].clone()
    up[0, 20] = 1.0                                        # q row, v adapter's columns
    rewrite(flux_file, tensors={f"{QKV}.lora_up.weight": up})
    expect_error(flux_file, FLUX_INV, "non-zero weights outside its adapters' blocks")
    rewrite(sdxl_file, drop=[f"{TO_Q}.lora_up.weight"])
    expect_error(sdxl_file, SDXL_INV, "has no '.lora_up.weight' tensor")


def test_edited_alpha_is_applied_like_a_stock_loader_would_and_warned_about(sdxl_file):
    before = load_tlora_file(sdxl_file, SDXL_INV)
    assert before.warnings == []
    rewrite(sdxl_file, tensors={"lora_unet_label_emb_0_0.alpha": torch.tensor(4.0)})   # k = 8
    after = load_tlora_file(sdxl_file, SDXL_INV)
    torch.testing.assert_close(after.adapters["label_emb.0.0"][0].up,
                               before.adapters["label_emb.0.0"][0].up * 0.5, rtol=0, atol=0)
    (warning,) = after.warnings
    for needle in ("dog.safetensors", "'lora_unet_label_emb_0_0.alpha' = 4 for 8 columns", "edited"):
        assert needle in warning, needle


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool,
                                   torch.complex64])
@pytest.mark.parametrize("part", ["lora_down.weight", "lora_up.weight", "alpha"])
def test_a_tensor_of_another_type_than_float_is_refused_naming_key_and_type(sdxl_file, dtype, part):
    """Integer weights once loaded and failed inside the sampler; an integer alpha was read as its
    bytes' integer value (8.0 stored as I32 bits: 1.09e9)."""
    key = f"{TO_Q}.{part}"
    tensor = read_raw(sdxl_file)[0][key]
    rewrite(sdxl_file, tensors={key: tensor.view(torch.int32) if dtype == torch.int32 else tensor.to(dtype)})
    expect_error(sdxl_file, SDXL_INV, f"'{key}'", f"stored as {str(dtype).removeprefix('torch.')}")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_tensors_are_up_cast_exactly(tmp_path, sdxl_file, dtype):
    sd, meta = read_raw(sdxl_file)
    fp8 = {k: t.to(dtype) if not k.endswith(".alpha") else t for k, t in sd.items()}
    rewrite(sdxl_file, tensors=fp8)
    exact = tmp_path / "exact.safetensors"
    save_file({k: t.float() for k, t in fp8.items()}, str(exact), metadata=meta)
    got, want = load_tlora_file(sdxl_file, SDXL_INV), load_tlora_file(exact, SDXL_INV)
    assert got.warnings == [] and set(got.adapters) == set(want.adapters)
    for module, group in want.adapters.items():
        for a, b in zip(got.adapters[module], group, strict=True):
            assert a.down.dtype == a.up.dtype == torch.float32
            assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up)


def test_a_float64_file_gives_float32_adapters(sdxl_file):
    want = load_tlora_file(sdxl_file, SDXL_INV)
    rewrite(sdxl_file, tensors={k: t.double() for k, t in read_raw(sdxl_file)[0].items()})
    got = load_tlora_file(sdxl_file, SDXL_INV)
    for module, group in want.adapters.items():
        for a, b in zip(got.adapters[module], group, strict=True):
            # one dtype for both factors: a float64 down beside a float32 up failed in the sampler
            assert a.down.dtype == a.up.dtype == torch.float32
            assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down)


def test_a_zero_rank_layer_is_refused_naming_the_key(sdxl_file):
    rewrite(sdxl_file, tensors={f"{TO_Q}.lora_down.weight": torch.zeros(0, 32),
                                f"{TO_Q}.lora_up.weight": torch.zeros(32, 0)})
    expect_error(sdxl_file, SDXL_INV, f"'{TO_Q}.lora_down.weight' is empty", "rank 0")


@pytest.mark.parametrize("alpha,needle", [(torch.tensor(0.0), "is 0"), (torch.tensor(-8.0), "never negative"),
                                          (torch.tensor([8.0, 8.0]), "holds 2 values"),
                                          (torch.tensor(float("nan")), "NaN/Inf")])
def test_an_alpha_that_no_loader_reads_alike_is_refused(sdxl_file, alpha, needle):
    rewrite(sdxl_file, tensors={f"{TO_Q}.alpha": alpha})
    expect_error(sdxl_file, SDXL_INV, f"'{TO_Q}.alpha'", needle)


@pytest.mark.parametrize("dropped", ["tlora.format_version", "tlora.power", "tlora.T"])
def test_a_missing_header_key_with_a_known_value_is_warned_about_not_lost(sdxl_file, dropped):
    want = load_tlora_file(sdxl_file, SDXL_INV)
    rewrite(sdxl_file, drop=[dropped])
    got = load_tlora_file(sdxl_file, SDXL_INV)
    assert got.source_format == "tlora" and got.schedule == want.schedule == \
        core.adapter.RankSchedule(4, 2, 1.0, 1000)
    (warning,) = got.warnings
    assert "dog.safetensors" in warning and f"'{dropped}' is missing" in warning


def test_a_file_read_as_a_plain_lora_despite_tlora_metadata_says_so(tmp_path, sdxl_file):
    import reference_files as rf

    from comfy_runtime import TINY_SDXL_CONFIG
    from tlora_core.files.layout import HEADER_KEYS

    inventory = rf.sdxl_inventory(TINY_SDXL_CONFIG)
    stripped = tmp_path / "stripped.safetensors"
    module = "output_blocks.0.1.transformer_blocks.0.attn2.to_v"
    out, inp = inventory[module]
    save_file({f"lora_unet_{module.replace('.', '_')}.lora_down.weight": torch.ones(2, inp),
               f"lora_unet_{module.replace('.', '_')}.lora_up.weight": torch.ones(out, 2)}, str(stripped),
              metadata={"tlora.training": "{}", "ss_network_dim": "2"})
    loaded = load_tlora_file(stripped, inventory)
    assert loaded.schedule is None and loaded.source_format == "lora"
    (warning,) = loaded.warnings
    for needle in ("stripped.safetensors", "'tlora.training'", "without a rank schedule"):
        assert needle in warning, needle
    assert not set(HEADER_KEYS) & set(read_raw(stripped)[1])


def test_an_unexpected_exception_while_reading_names_the_file_and_logs_its_cause(sdxl_file, monkeypatch,
                                                                                   caplog):
    import tlora_core.files.read as read

    def broken(*args, **kwargs):
        raise ZeroDivisionError("integer modulo by zero")

    monkeypatch.setattr(read, "read_own_format", broken)
    with caplog.at_level(logging.ERROR):
        message = expect_error(sdxl_file, SDXL_INV, "ZeroDivisionError: integer modulo by zero")
    assert "the log has the details" in message
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "dog.safetensors" in record.getMessage() and record.exc_info[0] is ZeroDivisionError


@pytest.mark.parametrize("keys", [
    ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
     "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"],
    ["text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"],
    ["lora_te2_text_model_encoder_layers_3_self_attn_out_proj.alpha"],
])
def test_a_text_encoder_only_file_is_said_to_be_one(keys):
    """Text-encoder names (self_attn.q_proj) resemble Anima's: they were said to look made for it."""
    from tlora_core.files.describe import no_match_message

    assert guess_file_architecture(keys) == "text-encoder"
    message = no_match_message("te.safetensors", keys, "sdxl")
    assert message.startswith("te.safetensors: holds text-encoder layers only") and "Anima" not in message
    # Beside diffusion-model keys, text-encoder keys do not decide what the file is made for.
    assert guess_file_architecture([*keys, "lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == "flux"


@pytest.mark.parametrize("label,keys_arch,model,needles,absent", [
    # a FLUX file labelled SDXL on an SDXL model once said "looks made for SDXL; the model is SDXL"
    ("sdxl", "flux", "sdxl", ["look made for FLUX", "metadata says SDXL (tlora.architecture = 'sdxl')",
                              "the model is SDXL"], ["made for SDXL"]),
    ("flux", "flux", "sdxl", ["The file looks made for FLUX; the model is SDXL"], ["although"]),
    ("sdxl", "sdxl", "sdxl", ["labelled for SDXL", "like this model", "another size or version"],
     ["looks made for"]),
    (None, "sdxl", "sdxl", ["has the layer names of SDXL", "like this model"], ["looks made for"]),
    ("sd15", "sd1", "flux", ["The file looks made for SD 1.5; the model is FLUX"], ["although"]),
])
def test_label_and_key_names_never_contradict_each_other(label, keys_arch, model, needles, absent):
    from tlora_core.files.describe import no_match_message

    keys = {"flux": ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"],
            "sdxl": ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"],
            "sd1": ["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight"]}[keys_arch]
    message = no_match_message("f.safetensors", keys, model, {"tlora.architecture": label} if label else {})
    for needle in needles:
        assert needle in message, (needle, message)
    for needle in absent:
        assert needle not in message, (needle, message)


@pytest.mark.parametrize("data", [bytes(range(7, 250)) * 3, __import__("pickle").dumps({"a": 1})],
                         ids=["garbage", "plain-pickle"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_the_safe_loader_cannot_parse_is_not_called_unsafe(tmp_path, data):
    path = tmp_path / "junk.pt"
    path.write_bytes(data)
    message = expect_error(path, SDXL_INV, "corrupt", "not written by torch.save")
    assert "could run code" not in message


def test_a_pickle_with_a_non_string_key_says_so(tmp_path):
    path = tmp_path / "intkeys.pt"
    torch.save({1: torch.zeros(2)}, path)
    expect_error(path, SDXL_INV, "entry 1 is named by a int, not a string")


def test_detect_format_tells_every_supported_kind_apart(sdxl_file):
    sd, meta = read_raw(sdxl_file)
    cases = {
        "tlora": (sd.keys(), meta),
        "lora": (sd.keys(), {}),
        "reference-sdxl": (["down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor."
                            "to_q_lora.q_layer.weight"], {}),
        "reference-flux": (["single_transformer_blocks.3.attn.processor.to_k_lora.down.weight"], {}),
        "lycoris": (["lycoris_transformer_blocks_0_attn_to_q.lambda_layer"], {}),
        "unknown": (["model.diffusion_model.input_blocks.0.0.weight"], {}),
    }
    assert {name: detect_format(keys, m) for name, (keys, m) in cases.items()} == \
        {name: name for name in cases}


@pytest.mark.parametrize("keys,meta,expected", [
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"], {}, "flux"),
    (["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"], {}, "flux"),
    (["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"], {}, "sdxl"),
    (["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha",
      "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"], {}, "sd1"),
    (["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"], {}, "sd3"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"], {}, "text-encoder"),
    (["x.alpha"], {"modelspec.architecture": "flux-1-dev/lora"}, "flux"),
    (["x.alpha"], {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    (["x.alpha"], {"ss_base_model_version": "sd_v1"}, "sd15"),          # a family's own label
    (["x.alpha"], {"tlora.architecture": "sd15"}, "sd15"),
    (["x.alpha"], {"ss_base_model_version": "sd_v2"}, "sd1"),           # other tools' words
])
def test_guess_file_architecture(keys, meta, expected):
    assert guess_file_architecture(keys, meta) == expected


@pytest.mark.parametrize("keys,expected", [
    # diffusers spells FLUX's double blocks, SD3's joint blocks and Qwen-Image's blocks alike ...
    (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], "diffusers-joint"),
    (["lora_transformer_transformer_blocks_0_attn_add_k_proj.lora_down.weight"], "diffusers-joint"),
    # ... the file's other keys tell them apart: FLUX's single blocks, SD3.5's attn2, Qwen's MLPs
    (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
      "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"], "flux"),
    (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
      "transformer.transformer_blocks.0.attn2.to_q.lora_A.weight"], "sd3"),
    (["lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight",
      "lora_unet_joint_blocks_1_x_block_attn_qkv.lora_down.weight"], "sd3"),
    (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
      "transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight"], "qwen_image"),
    (["lora_unet_transformer_blocks_59_attn_add_v_proj.lora_down.weight",
      "lora_unet_transformer_blocks_59_txt_mlp_net_2.lora_down.weight"], "qwen_image"),
    # a UNet's attn2 is not SD3's
    (["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q.lora_A.weight"], "sdxl"),
])
def test_guess_tells_diffusers_flux_sd3_and_qwen_files_apart(keys, expected):
    assert guess_file_architecture(keys, {}) == expected


@pytest.mark.parametrize("keys,expected", [
    (["lora_unet_blocks_0_attn_wq.lora_down.weight"], "krea2"),
    (["transformer.transformer_blocks.3.attn.to_gate.lora_A.weight"], "krea2"),
    (["diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight"], "anima"),
    (["lora_unet_blocks_2_cross_attn_output_proj.alpha"], "anima"),
    (["lora_unet_layers_0_attention_qkv.lora_up.weight"], "zimage"),
    (["diffusion_model.layers.4.attention.to_k.lora_B.weight"], "zimage"),
    (["diffusion_model.noise_refiner.0.feed_forward.w2.lora_A.weight"], "zimage"),
])
def test_families_without_generic_rules_are_told_by_their_own_key_hints(keys, expected):
    assert guess_file_architecture(keys, {}) == expected


def test_every_known_familys_own_file_keys_are_guessed_as_it(comfy, family):
    """The keys ComfyUI's stock loader reads for a tiny model's target layers (kohya's
    ``lora_unet_`` spelling of its module paths) are guessed as that model's family, or as what
    names alone cannot tell apart (FLUX.2 / Chroma write FLUX.1's block names; Qwen-Image's
    attention is spelled as FLUX's and SD3's joint blocks)."""
    import family_configs
    from tlora_core import families
    from tlora_core.inventory import inventory_from_module

    model = comfy.build_model(family)
    spec = families.get(family_configs.registry_id(family))
    targets = spec.targets(inventory_from_module(model.model.diffusion_model))
    keys = [f"lora_unet_{t.module.replace('.', '_')}.lora_down.weight" for t in targets]
    same_names = {"flux2": "flux", "chroma": "flux", "sd15": "sd1"}
    allowed = {spec.id, same_names.get(spec.id)} | ({"diffusers-joint"} if spec.diffusers_joint_blocks else set())
    assert guess_file_architecture(keys, {}) in allowed


def test_inventory_and_architecture_of_a_module_tree_on_the_meta_device():
    def tree(**children):
        module = torch.nn.Module()
        for name, child in children.items():
            module.add_module(name, child)
        return module

    with torch.device("meta"):
        flux = tree(double_blocks=torch.nn.ModuleList([tree(img_attn=tree(qkv=torch.nn.Linear(8, 24)))]))
        sdxl = tree(input_blocks=torch.nn.ModuleList([torch.nn.Conv2d(4, 8, 3)]),
                    label_emb=torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(40, 8))))
    assert inventory_from_module(flux) == {"double_blocks.0.img_attn.qkv": (24, 8)}
    assert detect_architecture(inventory_from_module(flux)) == "flux"
    inv = {"input_blocks.4.1.proj_in": (8, 8), **inventory_from_module(sdxl)}
    assert detect_architecture(inv) == "sdxl"
    assert detect_architecture({"input_blocks.4.1.proj_in": (8, 8)}) == "unknown"


def test_rank_index_beyond_the_schedule_is_refused(sdxl_file):
    meta = read_raw(sdxl_file)[1]
    layout = {"label_emb.0.0": [{"rows": None, "columns": 8, "parts": 2,
                                 "rank_index": [0, 1, 2, 7, 0, 1, 2, 3]}]}
    rewrite(sdxl_file, metadata={"tlora.layout": json.dumps(layout)})
    assert meta["tlora.rank"] == "4"
    expect_error(sdxl_file, SDXL_INV, "rank indices 0..7 do not fit rank 4")
    assert collections.Counter(json.loads(read_raw(sdxl_file)[1]["tlora.layout"])) == \
        collections.Counter(layout)


def test_a_file_labelled_for_another_family_than_its_layers_fit_is_warned_about(sdxl_file, caplog):
    from tlora_core import families

    sdxl = families.get("sdxl")
    assert load_tlora_file(sdxl_file, SDXL_INV, family=sdxl).warnings == []
    rewrite(sdxl_file, metadata={"tlora.architecture": "sd15"})
    with caplog.at_level(logging.WARNING):
        loaded = load_tlora_file(sdxl_file, SDXL_INV, family=sdxl)
    assert len(loaded.adapters) == len(SDXL_INV)          # the layers fit: still applied
    (warning,) = loaded.warnings
    for needle in ("dog.safetensors", "'tlora.architecture'", "'sd15'", "SDXL"):
        assert needle in warning, needle
    assert any("'tlora.architecture'" in r.getMessage() for r in caplog.records)
