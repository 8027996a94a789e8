"""LyCORIS ``tlora`` files on rounded bases are never silently off (issue 19, item 5).

A LyCORIS T-LoRA file stores no frozen factors; the Loader rebuilds them as the top-r SVD of the
model's base weights (``tlora_core.files.foreign_tlora``). Checked here on every quantized layout of
the fixtures (``quantized_models``):

- the rebuild reads the weights the base computes with (dequantized: GGUF blocks, QuantizedTensor,
  fp8, scale_weight), never packed storage and never another LoRA's patches: the adapters equal
  those read on the dequantized float twin, bit for bit, with or without a stock LoRA merged;
- on a rounded base the Loader warns, naming the file and the storage, with the figure of
  ``tlora_core.rounded_base`` (how far the rebuilt factors move when the weights move within their
  rounding step); not on a full-precision one. The figure is of the size of the actual error
  (measured against the full-precision original: 0.73 to 1.34 times it; bound a factor 2);
- an untrained file changes a rounded base, which is the error; the file converted once against
  the full-precision model file (``scripts/convert_lycoris_tlora.py``) holds exactly the
  full-precision result's adapters and changes nothing where it should change nothing.
"""

from __future__ import annotations

import importlib
import logging
import re
import subprocess
import sys

import pytest
import quantized_loras as ql
import quantized_models as qm
import torch
from safetensors.torch import save_file

import comfy_runtime

pytestmark = pytest.mark.comfy

ROUNDED = tuple(name for name, spec in qm.LAYOUTS.items() if spec.rounded)
FIGURE = re.compile(r"rounding step: ([\d.e+]+)% of this file's change on this base \(median over (\d+) of "
                    r"(\d+) layers, largest ([\d.e+]+)%\)")
SCRIPT = comfy_runtime.REPO / "scripts" / "convert_lycoris_tlora.py"


@pytest.fixture(scope="module")
def loader(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.loader")


def read(loader, model, name: str):
    return loader.load_for_model(model, name, -1, 0.0, False)


def rounded_warnings(weights) -> list[str]:
    return [w for w in weights.warnings if "LyCORIS T-LoRA on a rounded base" in w]


def full_rank(weights) -> dict[tuple[str, tuple | None], torch.Tensor]:
    return {(m, a.out_rows): a.up.double() @ a.down.double() for m, g in weights.adapters.items() for a in g}


@pytest.mark.parametrize("case", qm.params(qm.WITH_FLUX2))
def test_lycoris_rebuilds_from_the_weights_the_base_computes_with(comfy, loader, loras_dir, case):
    family, layout = case
    base = qm.load(family, layout)
    name = ql.write_lycoris(base, loras_dir, "lycoris.safetensors")
    on_base, on_twin = read(loader, base.model, name), read(loader, base.twin, name)   # GGUF: no size error
    assert ql.adapters_equal(on_base, on_twin)
    assert len(on_base.adapters) >= 2


@pytest.mark.parametrize("case", qm.params(qm.WITH_FLUX2, layouts=("fp8_e4m3fn", "fp8_scaled_keys", "nvfp4", "gguf_q4_k",
                                                    "gguf_q8_0")))
def test_the_rebuild_ignores_a_stock_lora_merged_into_or_hung_on_the_base(comfy, loader, loras_dir, case):
    import comfy.model_management
    import nodes

    family, layout = case
    base = qm.load(family, layout)
    stock_file = ql.write_tlora(base, loras_dir, "stock.safetensors")
    name = ql.write_lycoris(base, loras_dir, "lycoris.safetensors")
    alone = read(loader, base.model, name)
    stock = nodes.LoraLoaderModelOnly().load_lora_model_only(base.model, stock_file, 1.0)[0]
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([stock])    # merged (fp8, ...) or hung on (GGUF)
    patched = [m for m in stock.model.diffusion_model.modules()
               if getattr(getattr(m, "weight", None), "patches", None)]
    assert bool(patched) == (qm.LAYOUTS[layout].loader == "gguf") and (patched or stock.backup)
    assert ql.adapters_equal(read(loader, stock, name), alone)


@pytest.mark.parametrize("case", qm.params(qm.WITH_FLUX2))
def test_the_loader_warns_on_a_rounded_base_with_its_figure(comfy, loader, loras_dir, case, caplog):
    family, layout = case
    base = qm.load(family, layout)
    name = ql.write_lycoris(base, loras_dir, "my_lycoris.safetensors")
    with caplog.at_level(logging.WARNING):
        weights = read(loader, base.model, name)
    logged = [r.getMessage() for r in caplog.records if "rounded base" in r.getMessage()]
    if not qm.LAYOUTS[layout].rounded:
        assert rounded_warnings(weights) == [] and logged == []
        return
    (warning,) = rounded_warnings(weights)
    assert logged == [warning]
    assert warning.startswith("my_lycoris.safetensors: ")
    storage = importlib.import_module(f"{comfy_runtime.PACK_NAME}.tlora_core.base_weight").storage_of
    label = storage(base.model.model.diffusion_model.get_submodule(next(iter(weights.adapters)))).label
    assert label in warning
    match = FIGURE.search(warning)
    assert match, warning
    median, measured, layers, largest = map(float, match.groups())
    assert 0 < measured <= layers and 0 < median <= largest
    assert "convert_lycoris_tlora.py --base" in warning


def test_no_rounded_warning_on_the_full_precision_base(comfy, loader, loras_dir):
    base = qm.load("flux", "fp8_scaled_header")
    weights = read(loader, base.full, ql.write_lycoris(base, loras_dir, "lycoris.safetensors"))
    assert rounded_warnings(weights) == []
    assert any("bit-identical" in w for w in weights.warnings)   # the general LyCORIS caveat stays


@pytest.mark.parametrize("case", qm.params(qm.WITH_FLUX2, layouts=ROUNDED))
def test_the_figure_is_the_size_of_the_actual_error(comfy, loader, loras_dir, case):
    """Actual error per layer: ``||D(Wq) - D(W0)|| / ||D(Wq)||`` against the full-precision original
    (which the Loader does not have). Measured on the tiny FLUX (median over its layers, the
    warning's figure in brackets): fp8 e4m3 6.0% (6.9%), e5m2 13.9% (13%), int8 2.5% (2.8%), nvfp4
    20.5% (25%), mxfp8 6.2% (6.6%), Q8_0 1.6% (1.3%), Q4_0 20.8% (26%), Q4_K 19.7% (25%); over the
    five families the figure is 0.73 to 1.34 times the actual median. Bound: a factor 2."""
    family, layout = case
    base = qm.load(family, layout)
    name = ql.write_lycoris(base, loras_dir, "lycoris.safetensors")
    on_base, on_full = read(loader, base.model, name), read(loader, base.full, name)
    here, there = full_rank(on_base), full_rank(on_full)
    actual = sorted(float(torch.linalg.norm(here[k] - there[k]) / torch.linalg.norm(here[k])) for k in here)
    median = actual[len(actual) // 2]
    figure = float(FIGURE.search(rounded_warnings(on_base)[0]).group(1)) / 100
    assert median > 0.005
    assert median / 2 <= figure <= 2 * median, (figure, actual)


@pytest.mark.parametrize("case", qm.params(qm.WITH_FLUX2, layouts=("fp8_e4m3fn", "fp8_scaled_legacy", "int8_tensorwise", "nvfp4",
                                                    "mxfp8", "gguf_q4_0", "gguf_q4_k")))
def test_converted_file_gives_the_full_precision_adapters_on_a_rounded_base(comfy, loader, loras_dir, case):
    family, layout = case
    base = qm.load(family, layout)
    name = ql.write_lycoris(base, loras_dir, "lycoris.safetensors")
    full_file = ql.write_full_precision(base, loras_dir.parent / "full_model.safetensors")
    done = subprocess.run([sys.executable, str(SCRIPT), "--base", str(full_file), str(loras_dir / name)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert (loras_dir / "lycoris_tlora.safetensors").is_file()
    on_full = read(loader, base.full, name)
    converted = read(loader, base.model, "lycoris_tlora.safetensors")
    assert ql.adapters_equal(converted, on_full)                 # exact: the same tensors
    assert rounded_warnings(converted) == [] and converted.source_format == "tlora"
    assert not ql.adapters_equal(read(loader, base.model, name), on_full)   # the LyCORIS file is off there


@pytest.mark.parametrize("case", qm.params(families=("flux", "sdxl"), layouts=("fp8_scaled_keys", "nvfp4", "gguf_q4_k"),
                                           exact_only=True))
def test_an_untrained_file_changes_a_rounded_base_and_its_conversion_does_not(comfy, loader, loras_dir, case):
    family, layout = case
    base = qm.load(family, layout)
    name = ql.write_lycoris(base, loras_dir, "untrained.safetensors", drift=0.0)
    full_file = ql.write_full_precision(base, loras_dir.parent / "full_model.safetensors")
    convert = importlib.import_module(f"{comfy_runtime.PACK_NAME}.tlora_core.lycoris_convert").convert_lycoris
    convert(loras_dir / name, full_file, loras_dir / "converted.safetensors")

    def sample(model, lora=None):
        if lora is not None:
            model = loader.TLoRALoader.execute(model, lora, 1.0, -1, 0.0, False).result[0]
        with torch.inference_mode():
            return comfy_runtime.sample(model, family, steps=3, size=16, cfg=2.0)

    assert torch.equal(sample(base.full, name), sample(base.full))          # untrained: no change
    plain = sample(base.model)
    assert not torch.equal(sample(base.model, name), plain)                  # the rounded base's error
    assert torch.equal(sample(base.model, "converted.safetensors"), plain)   # converted: exact


def test_the_converter_refuses_a_quantized_base_and_a_file_that_needs_no_conversion(comfy, loras_dir, tmp_path):
    convert = importlib.import_module(f"{comfy_runtime.PACK_NAME}.tlora_core.lycoris_convert").convert_lycoris
    base = qm.load("flux", "fp8_scaled_header")
    name = ql.write_lycoris(base, loras_dir, "lycoris.safetensors")
    with pytest.raises(ValueError, match="quantized model file.*full-precision file"):
        convert(loras_dir / name, base.path, tmp_path / "out.safetensors")
    fp8_file = tmp_path / "fp8_unscaled.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v
               for k, v in base.full.model.diffusion_model.state_dict().items()}, str(fp8_file))
    with pytest.raises(ValueError, match="F8_E4M3.*not full precision"):
        convert(loras_dir / name, fp8_file, tmp_path / "out.safetensors")
    full_file = ql.write_full_precision(base, tmp_path / "full.safetensors")
    ours = ql.write_tlora(base, loras_dir, "ours.safetensors")
    with pytest.raises(ValueError, match="not a LyCORIS T-LoRA"):
        convert(loras_dir / ours, full_file, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
