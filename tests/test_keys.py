"""Name mapping: diffusers / kohya / LyCORIS names onto ComfyUI's SDXL (LDM) and FLUX (BFL) modules.

Pure tests use inventories generated from the architecture (tests/reference_files.py); the
``comfy`` tests check those against ComfyUI's own meta-device models and key maps once.
"""

from __future__ import annotations

import pytest
import reference_files as rf

from comfy_runtime import REAL_FLUX_CONFIG, REAL_SDXL_CONFIG, TINY_FLUX_CONFIG, TINY_SDXL_CONFIG
from tlora_core.families import bfl_names, unet_names
from tlora_core.files import names as keys
from tlora_core.inventory import Target

REAL_SDXL = rf.sdxl_inventory(REAL_SDXL_CONFIG)
TINY_SDXL = rf.sdxl_inventory(TINY_SDXL_CONFIG)
REAL_FLUX = rf.flux_inventory(REAL_FLUX_CONFIG)
TINY_FLUX = rf.flux_inventory(TINY_FLUX_CONFIG)


@pytest.mark.parametrize("inventory, expected", [
    (REAL_SDXL, (2, 2, 2)), (TINY_SDXL, (1, 1))])
def test_sdxl_layout_is_read_off_the_inventory(inventory, expected):
    assert unet_names.SdxlLayout.from_inventory(inventory).num_res_blocks == expected


# Known correspondences of the real SDXL (kohya's SDXL names vs diffusers' names).
@pytest.mark.parametrize("diffusers, ldm", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
     "input_blocks.8.1.transformer_blocks.9.attn2.to_k"),
    ("mid_block.attentions.0.transformer_blocks.3.ff.net.2", "middle_block.1.transformer_blocks.3.ff.net.2"),
    ("up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_out.0",
     "output_blocks.2.1.transformer_blocks.9.attn2.to_out.0"),
    ("up_blocks.1.attentions.0.proj_in", "output_blocks.3.1.proj_in"),
    ("up_blocks.1.resnets.2.time_emb_proj", "output_blocks.5.0.emb_layers.1"),
    ("down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"),
    ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
    ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.0.conv1", "output_blocks.6.0.in_layers.2"),
    ("add_embedding.linear_1", "label_emb.0.0"), ("time_embedding.linear_2", "time_embed.2"),
])
def test_sdxl_known_names(diffusers, ldm):
    layout = unet_names.SdxlLayout.from_inventory(REAL_SDXL)
    assert unet_names.sdxl_diffusers_to_ldm(diffusers, layout) == ldm
    assert unet_names.sdxl_ldm_to_diffusers(ldm, layout) == diffusers


@pytest.mark.parametrize("name", ["down_blocks.3.attentions.0.proj_in", "down_blocks.2.downsamplers.0.conv",
                                  "up_blocks.2.upsamplers.0.conv", "mid_block.attentions.1.proj_in",
                                  "down_blocks.0.resnets.2.time_emb_proj", "conv_whatever"])
def test_sdxl_names_outside_the_model_map_to_nothing(name):
    assert unet_names.sdxl_diffusers_to_ldm(name, unet_names.SdxlLayout.from_inventory(REAL_SDXL)) is None


@pytest.mark.parametrize("inventory", [REAL_SDXL, TINY_SDXL], ids=["real", "tiny"])
def test_every_sdxl_linear_has_a_diffusers_name_that_maps_back(inventory):
    layout = unet_names.SdxlLayout.from_inventory(inventory)
    for path in inventory:
        name = unet_names.sdxl_ldm_to_diffusers(path, layout)
        assert name is not None, path
        assert unet_names.sdxl_diffusers_to_ldm(name, layout) == path


@pytest.mark.parametrize("config, inventory", [(REAL_SDXL_CONFIG, REAL_SDXL), (TINY_SDXL_CONFIG, TINY_SDXL)],
                         ids=["real", "tiny"])
def test_reference_sdxl_attention_layers_all_map_with_their_shapes(config, inventory):
    index = keys.ModuleIndex(inventory)
    layers = rf.sdxl_attention_layers(config)
    targets = {}
    for name, shape in layers.items():
        target = index.resolve(name)
        assert target is not None and target.out_rows is None, name
        assert index.shape(target) == shape, name
        targets[target.module] = name
    attention = {p for p in inventory if ".attn1." in p or ".attn2." in p}
    assert set(targets) == attention
    if config is REAL_SDXL_CONFIG:
        assert len(targets) == 560


@pytest.mark.parametrize("name, module, rows", [
    ("transformer_blocks.3.attn.to_q", "double_blocks.3.img_attn.qkv", (0, 3072)),
    ("transformer_blocks.3.attn.to_k", "double_blocks.3.img_attn.qkv", (3072, 6144)),
    ("transformer_blocks.3.attn.to_v", "double_blocks.3.img_attn.qkv", (6144, 9216)),
    ("transformer_blocks.0.attn.add_k_proj", "double_blocks.0.txt_attn.qkv", (3072, 6144)),
    ("transformer_blocks.0.attn.to_out.0", "double_blocks.0.img_attn.proj", None),
    ("transformer_blocks.0.attn.to_add_out", "double_blocks.0.txt_attn.proj", None),
    ("transformer_blocks.18.ff_context.net.0.proj", "double_blocks.18.txt_mlp.0", None),
    ("single_transformer_blocks.37.attn.to_v", "single_blocks.37.linear1", (6144, 9216)),
    ("single_transformer_blocks.0.proj_mlp", "single_blocks.0.linear1", (9216, 21504)),
    ("single_transformer_blocks.0.proj_out", "single_blocks.0.linear2", None),
    ("x_embedder", "img_in", None), ("proj_out", "final_layer.linear", None),
    # the aliases ComfyUI 0.33+ maps as well (flux_to_diffusers): whole modules, no rows
    ("transformer_blocks.2.ff.linear_in", "double_blocks.2.img_mlp.0", None),
    ("transformer_blocks.2.ff.linear_out", "double_blocks.2.img_mlp.2", None),
    ("transformer_blocks.2.ff_context.linear_in", "double_blocks.2.txt_mlp.0", None),
    ("transformer_blocks.2.ff_context.linear_out", "double_blocks.2.txt_mlp.2", None),
    ("single_transformer_blocks.5.attn.to_qkv_mlp_proj", "single_blocks.5.linear1", None),
    ("single_transformer_blocks.5.attn.to_out", "single_blocks.5.linear2", None),
])
def test_flux_known_names(name, module, rows):
    target = bfl_names.flux_diffusers_to_bfl(name, bfl_names.FluxDims.from_inventory(REAL_FLUX))
    assert (target.module, target.out_rows, target.swap_halves) == (module, rows, False)


def test_flux_norm_out_is_the_swapped_modulation():
    target = bfl_names.flux_diffusers_to_bfl("norm_out.linear", bfl_names.FluxDims.from_inventory(TINY_FLUX))
    assert target == Target("final_layer.adaLN_modulation.1", None, True)


@pytest.mark.parametrize("config, inventory", [(REAL_FLUX_CONFIG, REAL_FLUX), (TINY_FLUX_CONFIG, TINY_FLUX)],
                         ids=["real", "tiny"])
def test_reference_flux_layers_cover_the_fused_rows(config, inventory):
    index = keys.ModuleIndex(inventory)
    h = config["hidden_size"]
    rows: dict[str, list] = {}
    for name, shape in rf.flux_attention_layers(config).items():
        target = index.resolve(name)
        assert index.shape(target) == shape, name
        rows.setdefault(target.module, []).append(target.out_rows)
    for module, spans in rows.items():
        if module.endswith((".qkv", ".linear1")):
            # q, k and v tile rows [0, 3h) of the fused layer exactly once each
            assert sorted(spans) == [(0, h), (h, 2 * h), (2 * h, 3 * h)], module
        else:
            assert spans == [None] and module.endswith("img_attn.proj")
    assert len(rows) == 3 * config["depth"] + config["depth_single_blocks"]


@pytest.mark.parametrize("name, module", [
    ("input_blocks_4_1_transformer_blocks_0_attn1_to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
     "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("output_blocks_2_1_transformer_blocks_9_attn2_to_out_0",
     "output_blocks.2.1.transformer_blocks.9.attn2.to_out.0"),
    ("mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
     "middle_block.1.transformer_blocks.0.ff.net.0.proj"),
])
def test_flattened_sdxl_names_resolve(name, module):
    assert keys.ModuleIndex(REAL_SDXL).resolve(name) == Target(module)


def test_flattened_flux_names_resolve_to_rows():
    index = keys.ModuleIndex(REAL_FLUX)
    assert index.resolve("transformer_blocks_0_attn_add_v_proj") == Target(
        "double_blocks.0.txt_attn.qkv", (6144, 9216))
    assert index.resolve("double_blocks_0_img_attn_qkv") == Target("double_blocks.0.img_attn.qkv")
    assert index.resolve("single_blocks.2.linear1_qkv") == Target("single_blocks.2.linear1", (0, 9216))
    assert index.resolve("double_blocks_19_img_attn_qkv") is None
    assert index.resolve("single_transformer_blocks_1_attn_to_qkv_mlp_proj") == Target(
        "single_blocks.1.linear1")
    assert index.resolve("transformer_blocks_0_ff_context_linear_in") == Target("double_blocks.0.txt_mlp.0")


def test_module_index_refuses_models_it_does_not_know():
    with pytest.raises(ValueError, match="neither an SDXL UNet nor a FLUX"):
        keys.ModuleIndex({"joint_blocks.0.x_block.attn.qkv": (3, 1)})


@pytest.mark.parametrize("key, expected", [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
     ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "down")),
    ("lora_unet_x.alpha", ("lora_unet_x", "alpha")),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight",
     ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", "up")),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
     ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", "up")),
    ("x.lora_linear_layer.down.weight", ("x", "down")),
    ("x.dora_scale", ("x", "dora")),
    ("lycoris_x.q_layer.weight", None), ("lora_up.weight", None),
])
def test_split_lora_key(key, expected):
    assert keys.split_lora_key(key) == expected


@pytest.mark.parametrize("name, expected", [
    ("lora_unet_a_b", ("a_b", False)), ("diffusion_model.a.b", ("a.b", False)),
    ("transformer.transformer_blocks.0.attn.to_q", ("transformer_blocks.0.attn.to_q", False)),
    ("transformer_blocks.0.attn.to_q", ("transformer_blocks.0.attn.to_q", False)),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1", ("lora_te1_text_model_encoder_layers_0_mlp_fc1", True)),
    ("text_encoder.text_model.x", ("text_encoder.text_model.x", True)),
])
def test_strip_prefix(name, expected):
    assert keys.strip_prefix(name) == expected


@pytest.mark.comfy
@pytest.mark.parametrize("family, config", [
    ("sdxl", REAL_SDXL_CONFIG), ("sdxl", TINY_SDXL_CONFIG), ("flux", REAL_FLUX_CONFIG),
    ("flux", TINY_FLUX_CONFIG)],
    ids=["sdxl-real", "sdxl-tiny", "flux-real", "flux-tiny"])
def test_generated_inventories_and_key_maps_match_comfyui(comfy, family, config):
    """Our inventories equal ComfyUI's models; every LoRA key ComfyUI maps, we map alike."""
    import comfy.lora as comfy_lora

    from tlora_core.inventory import inventory_from_module

    model = comfy.build_model(family, config, device="meta")
    inventory = inventory_from_module(model.diffusion_model)
    assert inventory == (rf.sdxl_inventory if family == "sdxl" else rf.flux_inventory)(config)
    index = keys.ModuleIndex(inventory)
    covered = set()
    for lora_key, to in comfy_lora.model_lora_keys_unet(model, {}).items():
        if isinstance(to, tuple):   # (path, (dim, start, size)) or (path, None, swap function)
            module, rows = to[0], None if to[1] is None else (to[1][1], to[1][1] + to[1][2])
        else:
            module, rows = to, None
        module = module.removeprefix("diffusion_model.").removesuffix(".weight")
        if module not in inventory:
            continue   # convolutions, norms, biases
        name = keys.strip_prefix(lora_key)[0]
        if ".processor." in name:
            name = keys.split_lora_key(name + "_lora.up.weight")[0]
        expected = Target(module, rows, isinstance(to, tuple) and to[1] is None)
        assert index.resolve(name) == expected, lora_key
        covered.add(module)
    assert covered == set(inventory)
