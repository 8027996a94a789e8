"""T-LoRA Loader on quantized bases: what ComfyUI's loaders return for fp8, fp8 scaled, int8, nvfp4,
mxfp8 and GGUF files (``quantized_models``) takes a T-LoRA as the float model does.

Reference: the dequantized float twin (``QuantizedBase.twin``) with the same T-LoRA. The adapters are
added to each layer's output in float32 (``tlora_core.apply``), so where ComfyUI computes the layer
in full precision on the CPU (fp8, nvfp4, mxfp8 emulated; GGUF dequantized per forward) the sampled
latent (3 steps, CFG 2: masks of several ranks) equals the twin's bit for bit. Where it does not
(``Layout.inexact_on``):

- int8 tensorwise: comfy_kitchen's CPU backend runs a real int8 matmul that also quantizes the
  activations, so the int8 model differs from its twin with or without a T-LoRA (measured 6e-5 to
  1e-2 of the latent's scale, one step). Checked on one step at CFG 1 (rounding noise compounds
  over steps): with the T-LoRA the difference stays within twice the base's own (measured 0.83 to
  1.29 times), and the T-LoRA's change of the latent matches the twin's change within 35% (RMS;
  measured 4-16%), where a missing or doubled adapter is off by 100%.
- 0.3.75's legacy scaled fp8 Linear scales the input instead of the weight: float32 rounding of the
  base layers, compounding over the steps (measured up to 2.5e-6 of the latent's scale, FLUX.2);
  bound 1e-5, while the T-LoRA moves the latent by more than 1e-3.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import quantized_loras as ql
import quantized_models as qm
import torch

import comfy_runtime

pytestmark = pytest.mark.comfy

STEPS = 3
LEGACY_TOL = 1e-5
INT8_CHANGE_TOL = 0.35
STOCK_WARNINGS = ("lora key not loaded", "NOT LOADED")


@pytest.fixture(scope="module")
def loader(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.loader")


@pytest.fixture(scope="module")
def preview(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.schedule_preview")


def apply(loader, model, *names: str, strength: float = 1.0):
    """``model`` with each T-LoRA of ``names`` applied by the Loader node in turn (a chain)."""
    for name in names:
        model = loader.TLoRALoader.execute(model, name, strength, -1, 0.0, False).result[0]
    return model


def sample(model, family: str, steps: int = STEPS, cfg: float = 2.0) -> torch.Tensor:
    with torch.inference_mode():
        return comfy_runtime.sample(model, family, steps=steps, size=16, cfg=cfg)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def assert_like_twin(version: str, layout: str, family: str, patched, twin_patched, base, twin) -> None:
    """The Loader's output on the quantized base against the twin's (see the module docstring)."""
    int8 = layout == "int8_tensorwise"
    steps, cfg = (1, 1.0) if int8 else (STEPS, 2.0)
    got, want = sample(patched, family, steps, cfg), sample(twin_patched, family, steps, cfg)
    change = want - sample(twin, family, steps, cfg)
    assert float(change.abs().max()) > 1e-3 * float(want.abs().max()), \
        "the T-LoRA does not change the twin's output: the comparison would prove nothing"
    if qm.LAYOUTS[layout].exact(version):
        assert torch.equal(got, want)
    elif int8:
        unpatched = sample(base, family, steps, cfg)
        base_error = float((unpatched - sample(twin, family, steps, cfg)).abs().max())
        assert float((got - want).abs().max()) <= 2 * base_error
        assert float(torch.linalg.norm(got - unpatched - change) / torch.linalg.norm(change)) < INT8_CHANGE_TOL
    else:
        assert _relative(got, want) < LEGACY_TOL


@pytest.mark.parametrize("case", qm.params(qm.WITH_FLUX2))
def test_loader_on_a_quantized_base_equals_the_dequantized_float_model(comfy, loader, loras_dir, case):
    family, layout = case
    base = qm.load(family, layout)
    name = ql.write_tlora(base, loras_dir, "tlora.safetensors")
    patched, twin_patched = apply(loader, base.model, name), apply(loader, base.twin, name)
    (holder,) = comfy_runtime.import_pack().nodes.patch.installed(patched)
    assert len(holder.weights.adapters) >= 2
    assert_like_twin(comfy.comfyui_version(), layout, family, patched, twin_patched, base.model, base.twin)
    assert patched is not base.model and not base.model.get_injections(holder.key)   # input untouched


@pytest.mark.parametrize("case", qm.params(qm.WITH_FLUX2, layouts=("fp8_e4m3fn", "fp8_scaled_keys", "fp8_scaled_legacy",
                                                    "int8_tensorwise", "nvfp4", "gguf_q4_k")))
def test_two_stacked_tloras_on_a_quantized_base(comfy, loader, loras_dir, case):
    family, layout = case
    base = qm.load(family, layout)
    first = ql.write_tlora(base, loras_dir, "first.safetensors", seed=7)
    second = ql.write_tlora(base, loras_dir, "second.safetensors", seed=8)
    patched = apply(loader, base.model, first, second)
    assert len(comfy_runtime.import_pack().nodes.patch.installed(patched)) == 2
    assert_like_twin(comfy.comfyui_version(), layout, family, patched, apply(loader, base.twin, first, second),
                     base.model, base.twin)
    # Two T-LoRAs are not one: the second one changes what the first one gives.
    assert not torch.equal(sample(patched, family), sample(apply(loader, base.model, first), family))


@pytest.mark.parametrize("case", qm.params(qm.WITH_FLUX2, layouts=("fp8_e4m3fn", "fp8_scaled_header", "nvfp4", "gguf_q4_0")))
def test_schedule_preview_on_a_quantized_model(comfy, preview, loras_dir, case, monkeypatch):
    family, layout = case
    base = qm.load(family, layout)
    name = ql.write_tlora(base, loras_dir, "tlora.safetensors")
    drawn = []
    draw = preview.draw_schedule
    monkeypatch.setattr(preview, "draw_schedule", lambda ranks, *a: drawn.append(ranks) or draw(ranks, *a))
    for model in (base.model, base.full):
        image = preview.TLoRASchedulePreview.execute(model, 10, "simple", 1.0, name, 16, -1, 0.0).result[0]
        assert image.shape == (1, preview.HEIGHT, preview.WIDTH, 3)
    # The same ranks on the quantized model as on the float one, rising from min_rank.
    assert drawn[0] == drawn[1] == sorted(drawn[0])
    assert drawn[0][0] == ql.MIN_RANK < drawn[0][-1] <= ql.RANK


def _merged_error(base, stock, adapters) -> tuple[torch.Tensor, torch.Tensor]:
    """Per changed weight: ``|merged - (Wq + dW)|`` and ``|Wq - (Wq + dW)|`` in units of the
    layout's rounding step at ``Wq + dW``, with ComfyUI's stock patches merged as a sampler loads
    the model (``load_models_gpu``: it first takes off another clone's patches)."""
    import comfy.model_management

    base_weight = importlib.import_module(f"{comfy_runtime.PACK_NAME}.tlora_core.base_weight")
    dm = base.model.model.diffusion_model
    merged_err, unmerged_err = [], []
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([stock])
        for module_name, group in adapters.items():
            module = dm.get_submodule(module_name)
            target = base.twin.model.diffusion_model.get_submodule(module_name).weight.detach().float().clone()
            for a in group:
                lo, hi = a.out_rows or (0, target.shape[0])
                target[lo:hi] += a.up.float() @ a.down.float()
            step = base_weight.storage_of(module).step(target).clamp(min=1e-30)
            merged = base_weight.parameter_value(module)
            original = base_weight.parameter_value(module, tensor=stock.backup[f"diffusion_model.{module_name}.weight"].weight)
            changed = (original - target).abs() > 0.5 * step
            merged_err.append(((merged - target).abs() / step)[changed])
            unmerged_err.append(((original - target).abs() / step)[changed])
    return torch.cat(merged_err), torch.cat(unmerged_err)


@pytest.mark.parametrize("case", qm.params(qm.WITH_FLUX2))
def test_the_stock_lora_loader_still_applies_to_the_quantized_base(comfy, loader, loras_dir, case, caplog):
    """ComfyUI's own LoraLoaderModelOnly reads the same file onto the quantized base with every key
    loaded. GGUF keeps the patches beside its blocks and adds them per forward in float: the result
    equals the twin's with the same LoRA bit for bit. The other layouts merge the LoRA into the
    stored weights and round the sum back into the layout (stochastic rounding): every changed
    weight lands within its rounding step of ``Wq + dW`` (measured median 0.28-0.36 steps, 99th
    percentile 0.9-1.26; bounds 0.5 and 1.5), while the LoRA moved them by 2-14 steps (so a merge
    that did nothing would fail). 0.3.75's own legacy scaled-fp8 layer merges worse: 99th
    percentile 1.1-7.6 steps (ComfyUI's path, not the pack's; 0.33 converts that layer), so only
    its median is bounded."""
    import nodes

    family, layout = case
    base = qm.load(family, layout)
    name = ql.write_tlora(base, loras_dir, "tlora.safetensors")
    with caplog.at_level(logging.WARNING):
        stock = nodes.LoraLoaderModelOnly().load_lora_model_only(base.model, name, 1.0)[0]
        twin_stock = nodes.LoraLoaderModelOnly().load_lora_model_only(base.twin, name, 1.0)[0]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith(STOCK_WARNINGS)] == []
    targets = {t.module for t in comfy_runtime.family_spec(family).targets(ql.inventory(base))}
    assert set(stock.patches) == {f"diffusion_model.{m}.weight" for m in targets}
    if qm.LAYOUTS[layout].loader == "gguf":
        unpatched = sample(base.model, family)
        assert torch.equal(sample(stock, family), sample(twin_stock, family))
    else:
        merged, unmerged = _merged_error(base, stock, loader.load_for_model(base.twin, name).adapters)
        assert float(unmerged.median()) > 1.5
        assert float(merged.median()) < 0.5
        if not (layout == "fp8_scaled_legacy" and comfy.comfyui_version() == "0.3.75"):
            assert float(merged.quantile(0.99)) < 1.5
        unpatched = sample(base.model, family)
        sample(stock, family)
    assert torch.equal(sample(base.model, family), unpatched)   # the stock patches came off again


@pytest.mark.parametrize("case", qm.params(families=("flux", "sd3", "flux2"), layouts=("fp8_scaled_header", "nvfp4",
                                                                               "gguf_q4_k"), detected_only=True))
def test_a_prompt_loads_the_quantized_file_and_applies_the_tlora(comfy, loras_dir, case):
    """The whole graph in ComfyUI's executor, from the file: Load Diffusion Model (or Unet Loader
    (GGUF)) -> T-LoRA Loader -> KSampler, with a Schedule Preview on the same MODEL. Families whose
    tiny shapes ComfyUI's detection reads on this runtime only (no answer is supplied)."""
    family, layout = case
    base = qm.load(family, layout)
    assert base.detected
    name = ql.write_tlora(base, loras_dir, "tlora.safetensors")
    spec = qm.LAYOUTS[layout]
    if spec.loader == "gguf":
        qm.gguf_loader_class()
        source = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": base.path.name}}
    else:
        source = {"class_type": "UNETLoader", "inputs": {"unet_name": base.path.name,
                                                         "weight_dtype": spec.weight_dtype}}

    def prompt(with_tlora: bool) -> dict:
        model = ["2", 0] if with_tlora else ["1", 0]
        return {
            "1": source,
            "2": {"class_type": "TLoRALoader", "inputs": {
                "model": ["1", 0], "lora_name": name, "strength_model": 1.0, "min_rank": -1,
                "schedule_power": 0.0, "schedule_ordinary_lora": False}},
            "3": {"class_type": "TLoRATestTinyClipLoader", "inputs": {"family": family}},
            "4": {"class_type": "TLoRATestTinyTextEncode", "inputs": {"clip": ["3", 0], "text": "a sks dog"}},
            "5": {"class_type": "TLoRATestTinyTextEncode", "inputs": {"clip": ["3", 0], "text": "blurry"}},
            "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
            "7": {"class_type": "KSampler", "inputs": {
                "model": model, "seed": 3, "steps": STEPS, "cfg": 2.0, "sampler_name": "euler",
                "scheduler": "normal", "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
                "denoise": 1.0}},
            "8": {"class_type": "TLoRASchedulePreview", "inputs": {
                "model": ["1", 0], "steps": 10, "scheduler": "simple", "denoise": 1.0, "lora_name": name,
                "rank": 16, "min_rank": -1, "schedule_power": 0.0}},
            "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
        }

    latents = {}
    for with_tlora in (True, False):
        executor, _ = comfy_runtime.run_prompt(prompt(with_tlora), outputs=["7", "9"])
        assert executor.success, executor.status_messages
        latents[with_tlora] = comfy_runtime.node_output(executor, "7")["samples"]
    assert torch.isfinite(latents[True]).all()
    assert not torch.equal(latents[True], latents[False])
