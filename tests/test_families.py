"""The family registry: recognition (exact class names, subclasses of known classes refused),
errors naming what is known, target rules against the real-size models, and the conventions
every node shares (default_min_rank, the automatic min_rank)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tlora_core import families
from tlora_core.families import Family, Layers, Recipe, TrainTarget
from tlora_core.schedule import AUTO_MIN_RANK, default_min_rank, resolve_min_rank


class _Named:
    """An object whose class has a given name (recognition looks at names only)."""


def _instance(class_name: str, config_name: str = "Config"):
    config = type(config_name, (), {})()
    return type(class_name, (_Named,), {"model_config": config})()


def test_every_family_has_a_tiny_test_config():
    import family_configs

    assert {family_configs.registry_id(tiny) for tiny in family_configs.TINY} == set(families.ids())


def test_every_family_file_is_found_and_listed_in_order():
    found = sorted(p.stem for p in Path(families.__file__).parent.glob("[!_]*.py")
                   if "FAMILY = Family(" in p.read_text(encoding="utf-8"))
    assert sorted(families.ids()) == found
    listed = families.all_families()
    assert [f.position for f in listed] == sorted(f.position for f in listed)
    labels = [f.label for f in listed]
    assert families.known_labels() == ", ".join(labels[:-1]) + " and " + labels[-1]
    assert families.known_labels("or") == ", ".join(labels[:-1]) + " or " + labels[-1]
    for family in families.all_families():
        assert families.get(family.id) is family
        assert family.timestep in families.TIMESTEP_RULES and family.recipe.rank >= 1


@pytest.mark.parametrize("class_name, config, expected", [
    ("SDXL", "SDXL", "sdxl"), ("Flux", "Flux", "flux"), ("BaseModel", "SD15", "sd15")])
def test_recognition_by_exact_class_name(class_name, config, expected):
    assert families.recognise(_instance(class_name, config)).id == expected


def test_a_shared_base_class_needs_the_config_class():
    # SD 2.x is a plain BaseModel too: without SD 1.5's config class it is not SD 1.5.
    with pytest.raises(families.UnknownFamily, match="its class is BaseModel \\(config SD20\\)"):
        families.recognise(_instance("BaseModel", "SD20"))


def test_unknown_model_names_its_class_and_the_known_families():
    known = families.known_labels()
    with pytest.raises(families.UnknownFamily, match=f"its class is Mystery .*knows {known}"):
        families.recognise(_instance("Mystery"))
    with pytest.raises(ValueError, match=f"unknown model family 'mystery': the pack knows {known}"):
        families.get("mystery")


def test_config_classes_tell_families_that_share_a_model_class_apart(monkeypatch):
    # Z-Image shares Lumina2's model class: a family names the config classes it accepts, so a
    # second family on that class (a made-up one here) is told apart by its config class too.
    other = Family(
        id="zz", label="ZZ", description="a ZZ model", model_classes=("Lumina2",),
        recognise_inventory=lambda inv: False, timestep="flow", latent_channels=16,
        pooled_output=False, layers=(Layers(r"\.qkv$"),), file_labels={},
        recipe=Recipe(variant="tlora", rank=8, why="test"), foreign_names=lambda inv: {},
        conditioning_widths=lambda c: (None, None), checkpoint_blocks=(), real_config={},
        config_classes=("ZZConfig",))
    monkeypatch.setitem(families._FAMILIES, "zz", other)
    assert families.recognise(_instance("Lumina2", "ZZConfig")) is other
    assert families.recognise(_instance("Lumina2", "ZImage")) is families.get("zimage")
    with pytest.raises(families.UnknownFamily, match="its class is Lumina2 \\(config Lumina2\\)"):
        families.recognise(_instance("Lumina2", "Lumina2"))


# FLUX.1 subclasses the pack has no family for; LongCatImage exists from 0.33 on, ChromaRadiance in
# every supported ComfyUI. One test over those present (nothing skipped on an older runtime).
UNKNOWN_SUBCLASSES = (("LongCatImage", "Flux"), ("ChromaRadiance", "Chroma"))


@pytest.mark.comfy
def test_subclasses_of_known_classes_in_comfyui_are_not_taken_for_their_parent(comfy):
    import comfy.model_base as model_base

    present = [(name, parent) for name, parent in UNKNOWN_SUBCLASSES if hasattr(model_base, name)]
    assert ("ChromaRadiance", "Chroma") in present
    for class_name, parent in present:
        cls = getattr(model_base, class_name)
        assert issubclass(cls, model_base.Flux)   # the trap: isinstance(model, Flux) is True
        model = cls.__new__(cls)                  # the real class, without building weights
        with pytest.raises(families.UnknownFamily) as err:
            families.recognise(model)
        message = str(err.value)
        assert f"its class is {class_name}" in message and f"derived from {parent}" in message
        assert families.known_labels() in message


@pytest.mark.comfy
def test_a_model_on_the_shared_base_class_is_not_called_derived(comfy):
    import comfy.model_base as model_base

    with pytest.raises(families.UnknownFamily) as err:
        families.recognise(model_base.HiDream.__new__(model_base.HiDream))   # a family the pack lacks
    assert "its class is HiDream (config none)" in str(err.value) and "derived" not in str(err.value)


@pytest.mark.comfy
def test_lumina_2_on_z_images_model_class_is_not_z_image(comfy):
    # Lumina-Image-2.0 as ComfyUI's detection gives it (2 of its layers): model_base.Lumina2 like
    # Z-Image, but config class Lumina2 and grouped key / value heads.
    import comfy.supported_models
    import torch

    config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 2304,
              "cap_feat_dim": 2304, "n_layers": 2, "qk_norm": True, "n_heads": 24, "n_kv_heads": 8,
              "axes_dims": [32, 32, 32], "axes_lens": [300, 512, 512], "rope_theta": 10000.0,
              "ffn_dim_multiplier": 4.0}
    model_config = comfy.supported_models.Lumina2(config)
    with torch.device("meta"):
        model = model_config.get_model({})
    assert type(model).__name__ in families.get("zimage").model_classes   # Z-Image's own class
    with pytest.raises(families.UnknownFamily, match="its class is Lumina2 \\(config Lumina2\\)") as err:
        families.recognise(model)
    assert "derived" not in str(err.value)
    with pytest.raises(families.UnknownFamily):
        families.from_inventory(_inventory(model.diffusion_model))



@pytest.mark.comfy
def test_qwen_image_is_recognised_and_models_derived_from_it_are_not(comfy):
    # Newer ComfyUI derives other models from model_base.QwenImage (0.33: MageFlow, its own
    # transformer and latents): exact class names keep them out.
    import comfy.model_base as model_base

    assert families.recognise(comfy.build_model("qwen_image", device="meta")).id == "qwen_image"
    derived, todo = [], list(model_base.QwenImage.__subclasses__())
    while todo:
        cls = todo.pop()
        derived.append(cls)
        todo.extend(cls.__subclasses__())
    for cls in derived:
        with pytest.raises(families.UnknownFamily, match=f"its class is {cls.__name__} .*derived from QwenImage"):
            families.recognise(cls.__new__(cls))


@pytest.mark.comfy
def test_qwen_images_last_text_layers_get_no_gradient_and_are_not_targets(comfy, pack):
    """The model discards the text stream after the last block: that block's text query, text
    output and text MLP get exactly zero gradient in ComfyUI's model, so they are not targets;
    every target (attention+ff) gets a gradient."""
    import importlib

    import torch

    import family_configs

    prepare = importlib.import_module(f"{pack.__name__}.training.prepare")
    dm = comfy.build_model("qwen_image").model.diffusion_model
    last = len(dm.transformer_blocks) - 1
    dead = {f"transformer_blocks.{last}.{name}" for name in
            ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")}
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(comfy.latent_shape("qwen_image", 1, 8), generator=gen)
    ctx, extra = family_configs.raw_inputs("qwen_image", 1, gen)
    with torch.inference_mode(False), torch.enable_grad(), prepare.comfy_training_flags():
        dm.requires_grad_(True)
        dm(x, torch.tensor([0.6]), ctx, **extra).square().sum().backward()
    linears = {name: m for name, m in dm.named_modules() if isinstance(m, torch.nn.Linear)}
    for name in dead:
        assert linears[name].weight.grad is None or torch.count_nonzero(linears[name].weight.grad) == 0, name
    targets = {t.module for t in families.get("qwen_image").targets(_inventory(dm), "attention+ff")}
    block_linears = {n for n in linears if n.startswith("transformer_blocks.") and "_mod." not in n}
    assert targets == block_linears - dead
    assert all(torch.count_nonzero(linears[name].weight.grad) > 0 for name in targets)

@pytest.mark.comfy
def test_the_tiny_models_of_comfyui_are_recognised(comfy, family):
    import family_configs

    model = comfy.build_model(family)
    assert families.recognise(model.model).id == family_configs.registry_id(family)
    assert families.from_inventory(_inventory(model.model.diffusion_model)).id == family_configs.registry_id(family)


def _inventory(dm):
    from tlora_core.inventory import inventory_from_module

    return inventory_from_module(dm)


def test_an_inventory_of_no_known_family_is_refused_with_what_is_known():
    with pytest.raises(ValueError) as err:
        families.from_inventory({"mystery.layers.0.attention.wq": (3, 1)})
    assert all(f.description in str(err.value) for f in families.all_families())


@pytest.mark.comfy
@pytest.mark.parametrize("scope", ["attention", "attention+ff"])
def test_targets_of_the_real_size_models(comfy, real_size, scope):
    """The family file's real configs on the meta device: recognised as the family, with the
    adapter count its tiny test config states (counted from ComfyUI's model code)."""
    import family_configs

    family, name = real_size
    real = families.get(family)
    dm = comfy.build_model(family, comfy.real_config(family, name), device="meta").diffusion_model
    assert families.from_inventory(_inventory(dm)) is real
    targets = real.targets(_inventory(dm), scope)
    assert len(targets) == family_configs.real_size_targets(family, name)[scope]
    assert all(isinstance(t, TrainTarget) and t.rows >= 1 for t in targets)


def test_fused_rows_split_per_projection():
    flux = families.get("flux")
    h, mlp = 8, 32
    inventory = {"double_blocks.0.img_attn.qkv": (3 * h, h), "double_blocks.0.txt_attn.proj": (h, h),
                 "single_blocks.0.linear1": (3 * h + mlp, h), "single_blocks.0.linear2": (h, h + mlp)}
    attention = [(t.module, t.out_rows) for t in flux.targets(inventory)]
    qkv = "double_blocks.0.img_attn.qkv"
    assert attention == [(qkv, (0, h)), (qkv, (h, 2 * h)), (qkv, (2 * h, 3 * h)),
                         ("single_blocks.0.linear1", (0, h)), ("single_blocks.0.linear1", (h, 2 * h)),
                         ("single_blocks.0.linear1", (2 * h, 3 * h))]
    ff = [(t.module, t.out_rows) for t in flux.targets(inventory, "attention+ff")]
    assert ff[-2:] == [("single_blocks.0.linear1", (3 * h, 3 * h + mlp)), ("single_blocks.0.linear2", None)]
    with pytest.raises(ValueError, match="unknown target scope"):
        flux.targets(inventory, "everything")
    with pytest.raises(ValueError, match="no attention layers found in this SDXL model"):
        families.get("sdxl").targets(inventory)


def test_flux2_linear1_mlp_rows_are_the_swiglu_gate_and_up():
    # FLUX.2's single-block linear1 is [q | k | v | gate + up], the MLP part 2 x 3h = 6h rows (FLUX.1: 4h).
    flux2 = families.get("flux2")
    h = 8
    inventory = {"double_stream_modulation_img.lin": (6 * h, h), "double_blocks.0.img_attn.qkv": (3 * h, h),
                 "double_blocks.0.img_attn.proj": (h, h), "single_blocks.0.linear1": (3 * h + 6 * h, h),
                 "single_blocks.0.linear2": (h, h + 3 * h)}
    assert families.from_inventory(inventory) is flux2
    ff = [(t.module, t.out_rows) for t in flux2.targets(inventory, "attention+ff")]
    assert ff[-2:] == [("single_blocks.0.linear1", (3 * h, 9 * h)), ("single_blocks.0.linear2", None)]
    assert not any(t.module.startswith("double_stream_modulation") for t in flux2.targets(inventory, "attention+ff"))


@pytest.mark.parametrize("rank, expected", [(64, 32), (32, 16), (7, 4), (3, 2), (1, 1)])
def test_default_min_rank_is_half_rounded_up_and_agrees_with_the_fraction(rank, expected):
    assert default_min_rank(rank) == expected == resolve_min_rank(rank, 0.5)


def test_the_automatic_min_rank_is_one_value_on_every_node(comfy, pack):
    from comfyui_tlora.nodes.loader import TLoRALoader
    from comfyui_tlora.nodes.schedule_preview import TLoRASchedulePreview
    from comfyui_tlora.nodes.train import TLoRATrain

    for node in (TLoRALoader, TLoRASchedulePreview, TLoRATrain):
        schema = node.GET_SCHEMA()
        widget = next(i for i in schema.inputs if i.id == "min_rank")
        assert (widget.default, widget.min) == (AUTO_MIN_RANK, AUTO_MIN_RANK), node.__name__
        assert "-1 = automatic" in widget.tooltip and "half the rank" in widget.tooltip, node.__name__


@pytest.mark.parametrize("rank, expected", [(0, None), (4, 2), (5, 3), (128, 64)])
def test_train_resolves_the_automatic_min_rank_from_the_rank_it_trains(pack, rank, expected):
    # 0 = the family's recipe rank; the automatic min_rank is half of whichever rank is trained.
    from comfyui_tlora.training.job import resolve_config

    for family_id in families.ids():
        family = families.get(family_id)
        config = resolve_config(family, variant="auto", rank=rank, min_rank=AUTO_MIN_RANK, schedule_power=1.0,
                                steps=10, learning_rate=1e-4, batch_size=1, seed=0, target_layers="attention",
                                training_dtype="fp32", gradient_checkpointing=False, save_every=0)
        assert config.min_rank == (expected or default_min_rank(family.recipe.rank)), family_id


def test_file_labels_are_the_ones_stock_tools_read():
    assert families.get("sdxl").file_labels == {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                                                "ss_base_model_version": "sdxl_base_v1-0"}
    assert families.get("flux").file_labels == {"modelspec.architecture": "flux-1-dev/lora",
                                                "ss_base_model_version": "flux1"}
    assert families.get("sd15").file_labels == {"modelspec.architecture": "stable-diffusion-v1/lora",
                                                "ss_base_model_version": "sd_v1"}


def test_the_registry_needs_no_comfyui():
    code = ("import sys; from tlora_core import families; "
            "assert not any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules); "
            "print(families.known_labels())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.stdout.strip() == families.known_labels()


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@pytest.mark.comfy
def test_each_family_states_the_runtimes_it_is_tested_on(comfy):
    """A tiny test config's ``runtimes`` (the README's "tested on") lists this ComfyUI exactly
    when this ComfyUI has the family's model and config classes, and the family file's
    ``min_comfyui`` says so: a family deselected here (Krea 2 and Anima on 0.3.75) is one whose
    MODEL cannot exist here, never one whose tests fail."""
    import comfy.model_base
    import comfy.supported_models
    import comfyui_version

    import family_configs

    version = comfyui_version.__version__
    for family in families.all_families():
        tiny = family_configs.TINY[family.id]
        present = all(hasattr(comfy.model_base, c) for c in family.model_classes) and \
            hasattr(comfy.supported_models, tiny.supported_model)
        assert (version in tiny.runtimes) == present, family.id
        since = family.min_comfyui
        assert present == (since is None or _release(version) >= _release(since)), family.id
        assert all(since is None or _release(v) >= _release(since) for v in tiny.runtimes), family.id


@pytest.mark.comfy
def test_readme_family_table_is_generated_from_the_inventories(comfy):
    """The README holds the rows scripts/family_table.py generates on this runtime."""
    sys.path.insert(0, str(comfy.REPO / "scripts"))
    import family_table

    readme = (comfy.REPO / "README.md").read_text(encoding="utf-8")
    assert family_table.HEADER in readme
    missing = [line for line in family_table.rows() if line not in readme]
    assert not missing, "README family table out of date; rerun scripts/family_table.py:\n" + "\n".join(missing)


@pytest.mark.comfy
def test_z_image_diffusers_names_are_comfyuis(comfy):
    """Z-Image's diffusers spellings (``attention.to_q`` ... on rows of the fused qkv) land on the
    weights and rows ComfyUI's own key map gives them (``diffusion_model.<name>``)."""
    from comfy.lora import model_lora_keys_unet

    model = comfy.build_model("zimage")
    key_map = model_lora_keys_unet(model.model, {})
    ours = families.get("zimage").foreign_names(_inventory(model.model.diffusion_model))
    assert any(name.endswith(".attention.to_k") for name in ours)
    for name, target in ours.items():
        stock = key_map[f"diffusion_model.{name}"]
        weight = f"diffusion_model.{target.module}.weight"
        if target.out_rows is None:
            assert stock == weight, name
        else:
            start, end = target.out_rows
            assert stock == (weight, (0, start, end - start)), name


@pytest.mark.comfy
def test_sd3_diffusers_names_are_comfyuis(comfy):
    """SD3's diffusers spellings are exactly the Linear layers ComfyUI's own key map gives a
    ``transformer.`` name (comfy.utils.mmdit_to_diffusers), on the same weights and rows: q / k / v
    on thirds of the fused qkv (image, text, SD3.5's attn2), whole modules elsewhere, and the
    two modulations diffusers stores as [scale | shift] with their halves swapped."""
    from comfy.lora import model_lora_keys_unet

    from tlora_core.inventory import Target

    model = comfy.build_model("sd3")
    inventory = _inventory(model.model.diffusion_model)
    stock = {}
    for lora_key, to in model_lora_keys_unet(model.model, {}).items():
        if not lora_key.startswith("transformer."):
            continue
        key, rows, swap = to, None, False
        if isinstance(to, tuple):
            key, offset = to[0], to[1]
            if offset is None:      # (weight, None, swap_scale_shift)
                assert to[2].__name__ == "swap_scale_shift", lora_key
                swap = True
            else:
                rows = (offset[1], offset[1] + offset[2])
        module = key.removeprefix("diffusion_model.").removesuffix(".weight")
        if key.endswith(".weight") and module in inventory:
            stock[lora_key.removeprefix("transformer.")] = Target(module, rows, swap)
    ours = dict(families.get("sd3").foreign_names(inventory))
    assert {"transformer_blocks.0.attn2.to_k", "transformer_blocks.1.attn.add_v_proj",
            "norm_out.linear"} <= set(ours)
    assert ours == stock


def test_the_tiny_klein_variant_is_flux2_without_a_guidance_input(comfy):
    """The per-family tests run FLUX.2 twice: dev (guidance embedder) and Klein (none)."""
    klein, dev = comfy.build_model("flux2_klein").model, comfy.build_model("flux2").model
    assert type(klein).__name__ == type(dev).__name__ == "Flux2"
    has_guidance = [any(name.startswith("guidance_in.") for name, _ in m.diffusion_model.named_parameters())
                    for m in (klein, dev)]
    assert has_guidance == [False, True]


# Families whose diffusion model holds a text module with the blocks' own sub-names: the prefix of
# those Linears and the real size's count of them. Krea 2's text fusion: 2 layer-wise + 2 refiner
# blocks x (wq, wk, wv, gate, wo, mlp gate / up / down) + the projector; Anima's Qwen3 text adapter:
# 6 blocks x (self and cross attention q / k / v / o_proj, mlp.0 / mlp.2) + the out projection.
TEXT_MODULES = {"krea2": ("txtfusion.", 4 * 8 + 1), "anima": ("llm_adapter.", 6 * 10 + 1)}


@pytest.mark.comfy
@pytest.mark.parametrize("family", sorted(TEXT_MODULES))
@pytest.mark.parametrize("scope", ["attention", "attention+ff"])
def test_text_modules_inside_the_model_are_never_targets(comfy, family, scope):
    """Some of their Linears end like the targets (``attn.wq``, ``self_attn.q_proj``): only the
    rules' ``^blocks.`` anchor keeps them out, on the real-size model."""
    import re

    prefix, count = TEXT_MODULES[family]
    spec = families.get(family)
    inventory = _inventory(comfy.build_model(family, comfy.real_config(family), device="meta").diffusion_model)
    inside = [name for name in inventory if name.startswith(prefix)]
    assert len(inside) == count
    unanchored = [re.compile(rule.pattern.removeprefix("^")) for rule in spec.layers
                  if rule.scope == "attention" or scope == "attention+ff"]
    assert any(p.search(name) for p in unanchored for name in inside)   # the trap is real
    targets = spec.targets(inventory, scope)
    assert targets and not any(t.module.startswith(prefix) for t in targets)
    assert all(t.module.startswith("blocks.") for t in targets)


@pytest.mark.comfy
@pytest.mark.parametrize("family", ["krea2"])
def test_krea2_diffusers_names_are_comfyuis(comfy, family):
    """Krea 2's diffusers spellings are exactly the Linear layers ComfyUI's own key map gives a
    ``transformer.`` name (comfy.utils.krea2_to_diffusers): the blocks' attention (the output gate
    too, to_out with and without ".0"), feed-forward and text fusion, the embedders and the final
    layer; so a diffusers Krea 2 LoRA changes the same layers through T-LoRA Loader as through the
    stock loader."""
    from comfy.lora import model_lora_keys_unet

    from tlora_core.inventory import Target

    model = comfy.build_model(family)
    inventory = _inventory(model.model.diffusion_model)
    stock = {}
    for lora_key, to in model_lora_keys_unet(model.model, {}).items():
        module = to.removeprefix("diffusion_model.").removesuffix(".weight") if isinstance(to, str) else None
        if lora_key.startswith("transformer.") and module in inventory:
            stock[lora_key.removeprefix("transformer.")] = Target(module)
    ours = dict(families.get(family).foreign_names(inventory))
    assert {"transformer_blocks.0.attn.to_gate", "transformer_blocks.0.attn.to_out",
            "text_fusion.refiner_blocks.1.ff.down", "final_layer.linear"} <= set(ours)
    assert ours == stock


@pytest.mark.comfy
@pytest.mark.parametrize("family", ["krea2", "anima"])
def test_5d_latent_families_refuse_a_4d_latent(comfy, family, pack):
    """Their VAE's latents are (images, 16, frames, h, w); an image latent of another VAE is refused
    with the expected layout, the 5-D one accepted."""
    import torch
    from comfyui_tlora.training import inputs

    model = comfy.build_model(family).model
    spec = inputs.family_of(model)
    assert spec.latent_ndim == 5 and model.latent_format.latent_dimensions == 3
    with pytest.raises(ValueError, match=r"expects \(images, channels, frames, height, width\)"):
        inputs.latent_samples({"samples": torch.zeros(1, 16, 8, 8)}, model, spec)
    assert inputs.latent_samples({"samples": torch.zeros(1, 16, 1, 8, 8)}, model, spec).shape == (1, 16, 1, 8, 8)
