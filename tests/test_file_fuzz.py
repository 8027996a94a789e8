"""Seeded fuzz test: every damaged or unusual variant of a file the pack writes gets the right
result or a clear error, through the real T-LoRA Loader on real tiny ComfyUI models.

The variants and the outcome each must have are in ``file_fuzz_variants.py``; they start from files
``save_tlora`` wrote (with T-LoRA Train's ``tlora.training`` metadata) for tiny SDXL (float32, Ortho +
mask), FLUX (bfloat16, Vanilla, fused layers with an explicit layout), SD 1.5, SD3, Qwen-Image and
Z-Image models. Categories and counts (:data:`COUNTS`, asserted below), 222 in all: truncation 20,
random bytes 15, header edits 36, metadata edits 65, tensor edits 53, other architectures 14,
pickles 19.

Each variant is written into ComfyUI's loras folder and given to ``TLoRALoader.execute``; then

- refused: the pack's TLoRAFileError, whose message names the file and the expected words (the key,
  where there is one) and says none of the words it must not (a self-contradiction); any other
  exception fails the test;
- loaded: the warnings are exactly those expected (none, or one naming the file and the key), the
  adapters are the expected ones (exactly; a plain LoRA's full-rank delta to float32 rounding), and
  two sampling steps on the patched model run (finite, unless the variant scales a layer by 1e8);
- always: the base model's weights stay bit-identical and unpatched, and no pickle ran code.

Each variant's random choices are seeded from its id, so a failing one reproduces on its own.
"""

from __future__ import annotations

import importlib
import json
import random
import zlib
from dataclasses import dataclass, replace

import file_fuzz_variants as fv
import loader_fixtures as lf
import pytest
import torch
from file_format_helpers import read_raw

# torch warns that a pickle written by the pickle module (one variant) uses another protocol: noise.
pytestmark = [pytest.mark.comfy, pytest.mark.filterwarnings("ignore:Detected pickle protocol")]

# family -> (variant, stored dtype) of the file save_tlora writes for its tiny model
SOURCES = {"sdxl": ("tlora", torch.float32), "flux": ("vanilla", torch.bfloat16),
           "sd15": ("tlora", torch.float32), "sd3": ("vanilla", torch.float16),
           "qwen_image": ("tlora", torch.float32), "zimage": ("vanilla", torch.bfloat16)}
MODELS = ("sdxl", "flux")
COUNTS = {"truncation": 20, "random-bytes": 15, "header": 36, "metadata": 65, "tensors": 53,
          "architecture": 14, "pickle": 19}
TRAINING = json.dumps({"steps": 800, "learning_rate": 0.003, "rank": 4, "min_rank": 2})


@dataclass
class Fuzz:
    loader: object                              # the pack's nodes.loader
    error: type                                 # the pack's TLoRAFileError
    models: dict
    snapshots: dict
    sources: dict[str, fv.Source]

    def load(self, model, name: str):
        out = self.loader.TLoRALoader.execute(model, name, 1.0, -1, 0.0, False)
        patched = out.result[0]
        (holder,) = patched.attachments.values()
        return patched, holder.weights


def _state(model) -> dict:
    return {"weights": {k: v.detach().clone() for k, v in model.model.state_dict().items()},
            "patches": dict(model.patches), "attachments": dict(model.attachments)}


@pytest.fixture(scope="module")
def fuzz(comfy, pack, tmp_path_factory) -> Fuzz:
    write = importlib.import_module(f"{pack.__name__}.tlora_core.files.write")
    folder = tmp_path_factory.mktemp("fuzz_sources")
    sources = {"none": fv.Source("none", folder / "none", {}, {})}
    models = {}
    for family, (variant, dtype) in SOURCES.items():
        model = comfy.build_model(family)
        weights, _ = lf.make_tlora(model, family, variant=variant, rank=4, min_rank=2)
        path = write.save_tlora(folder / f"{family}.safetensors", replace(weights, source_format="tlora"),
                                dtype=dtype, inventory=lf.inventory(model),
                                extra_metadata={"tlora.training": TRAINING, "modelspec.title": family})
        sources[family] = fv.Source(family, path, *read_raw(path), path.read_bytes())
        if family in MODELS:
            models[family] = model
    assert "tlora.layout" in sources["flux"].metadata      # the layout edits need one
    return Fuzz(importlib.import_module(f"{pack.__name__}.nodes.loader"),
                importlib.import_module(f"{pack.__name__}.tlora_core.files.check").TLoRAFileError,
                models, {f: _state(m) for f, m in models.items()}, sources)


def test_the_fuzz_covers_every_category_with_the_counts_documented():
    assert fv.count_by_category() == COUNTS
    assert len({v.id for v in fv.VARIANTS}) == len(fv.VARIANTS)


def _assert_same_adapters(got, want) -> None:
    assert set(got.adapters) == set(want.adapters)
    for module, group in want.adapters.items():
        assert len(got.adapters[module]) == len(group), module
        for a, b in zip(got.adapters[module], group, strict=True):
            assert a.down.dtype == a.up.dtype == torch.float32, module
            assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up), module
            assert torch.equal(a.rank_index, b.rank_index), module
            assert (a.schedule, a.parts, a.out_rows) == (b.schedule, b.parts, b.out_rows), module


def _full_rank_deltas(weights, model) -> dict[str, torch.Tensor]:
    deltas = {}
    for module, group in weights.adapters.items():
        delta = torch.zeros(model.model.diffusion_model.get_submodule(module).weight.shape, dtype=torch.float64)
        for a in group:
            start, stop = a.out_rows or (0, delta.shape[0])
            delta[start:stop] += a.up.double() @ a.down.double()
        deltas[module] = delta
    return deltas


def _check_result(fuzz: Fuzz, expect: fv.Expect, weights, base, model, loras_dir) -> None:
    if expect.result == "plain":
        assert weights.source_format == "lora"
        assert all(a.schedule is None for group in weights.adapters.values() for a in group)
        got, want = _full_rank_deltas(weights, model), _full_rank_deltas(base, model)
        assert set(got) == set(want)
        for module, delta in want.items():
            torch.testing.assert_close(got[module], delta, rtol=1e-6, atol=1e-7, msg=module)
        return
    if expect.result == "reference":
        fv.tensors_file(expect.reference, fuzz.sources[base.architecture].metadata)(loras_dir / "reference.safetensors")
        _, base = fuzz.load(model, "reference.safetensors")
    elif expect.result == "scaled":
        stem, factor = expect.scaled
        module = next(m for m in base.adapters if f"lora_unet_{m.replace('.', '_')}" == stem)
        base.adapters[module] = [replace(a, up=a.up * factor, _device_copies={}) for a in base.adapters[module]]
    _assert_same_adapters(weights, base)


def _check_loaded(fuzz: Fuzz, variant: fv.Variant, made: fv.Made, name: str, patched, weights,
                  family: str, loras_dir, comfy) -> None:
    expect = made.expect
    assert expect.kind != "refused", f"{name} loaded, but must be refused ({expect.needles}); " \
                                     f"warnings: {weights.warnings}"
    assert all(name in w for w in weights.warnings), weights.warnings
    if expect.kind == "same":
        assert weights.warnings == [], weights.warnings
    else:
        assert len(weights.warnings) == 1, weights.warnings
        for needle in expect.needles:
            assert needle in weights.warnings[0], (needle, weights.warnings[0])
    model = fuzz.models[family]
    (loras_dir / "base.safetensors").write_bytes(fuzz.sources[variant.base].data)
    _, base = fuzz.load(model, "base.safetensors")
    assert base.warnings == []
    _check_result(fuzz, expect, weights, base, model, loras_dir)
    latent = comfy.sample(patched, family, steps=2, size=8)
    assert expect.result == "scaled" or bool(torch.isfinite(latent).all())


@pytest.mark.parametrize("variant", fv.VARIANTS, ids=lambda v: v.id)
def test_a_damaged_file_gets_the_right_result_or_a_clear_error(fuzz, loras_dir, comfy, variant):
    made = variant.build(fuzz.sources[variant.base], random.Random(zlib.crc32(variant.id.encode())))
    name = f"{variant.id}{made.suffix}"
    made.write(loras_dir / name)
    family = made.model or (variant.base if variant.base in MODELS else "sdxl")
    try:
        patched, weights = fuzz.load(fuzz.models[family], name)
    except fuzz.error as err:
        message = str(err)
        assert made.expect.kind == "refused", f"{name} refused, but must load: {message}"
        assert name in message, message
        for needle in made.expect.needles:
            assert needle in message, (needle, message)
        for needle in made.expect.absent:
            assert needle not in message, (needle, message)
    else:
        _check_loaded(fuzz, variant, made, name, patched, weights, family, loras_dir, comfy)
    for family_name, model in fuzz.models.items():
        now = _state(model)
        assert now["patches"] == fuzz.snapshots[family_name]["patches"]
        assert now["attachments"].keys() == fuzz.snapshots[family_name]["attachments"].keys()
        assert all(torch.equal(now["weights"][k], v) for k, v in fuzz.snapshots[family_name]["weights"].items())
    assert fv.CANARY_CALLS == []


def test_an_unexpected_exception_in_the_loader_names_the_file_and_logs_its_cause(fuzz, loras_dir, monkeypatch,
                                                                                   caplog):
    """What no check foresaw (here: a failure while the model's layers are listed) still reaches the
    user as an error naming the file, with the original exception kept as its cause and logged."""
    import logging

    (loras_dir / "dog.safetensors").write_bytes(fuzz.sources["sdxl"].data)

    def broken(module):
        raise ZeroDivisionError("integer modulo by zero")

    monkeypatch.setattr(fuzz.loader, "inventory_from_module", broken)
    with caplog.at_level(logging.ERROR), pytest.raises(fuzz.error) as info:
        fuzz.load(fuzz.models["sdxl"], "dog.safetensors")
    assert str(info.value).startswith("dog.safetensors: ") and "ZeroDivisionError" in str(info.value)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError and "dog.safetensors" in r.getMessage()
               for r in caplog.records)
