"""The quantized-base fixtures (``quantized_models``) hold what they promise.

For every family x layout this ComfyUI loads: the loader node returned layers of the expected
storage (QuantizedTensor / float8 / GGMLTensor of the written GGML type), the float twin samples
exactly like the quantized model where the layout computes in full precision on the CPU, and the
storage really rounded the weights (the twin is not the full-precision original). The Q4_K block
writer round-trips through gguf-py's own dequantizer.

Tolerances where a layout is not exact (``Layout.inexact_on``), relative to the latent's largest
value: 0.3.75's legacy scaled fp8 Linear scales the input instead of the weight (float32 rounding:
measured 7e-8 to 3.2e-7; bound 2e-6); int8 tensorwise runs comfy_kitchen's quantized matmul,
which also rounds the activations (measured 6e-5 to 1.0e-2, as large as the weights' own rounding
moves the latent; bound 3e-2).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import quantized_files
import quantized_models as qm
import torch

import comfy_runtime

pytestmark = pytest.mark.comfy

INEXACT_TOL = {"fp8_scaled_legacy": 2e-6, "int8_tensorwise": 3e-2}


@pytest.fixture(scope="module")
def base_weight(pack):
    return importlib.import_module(f"{pack.__name__}.tlora_core.base_weight")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("case", qm.params(qm.WITH_FLUX2))
def test_the_loader_node_returns_the_layouts_storage(comfy, base_weight, case):
    family, layout = case
    base = qm.load(family, layout)
    spec = qm.LAYOUTS[layout]
    version = comfy.comfyui_version()
    assert base.detected == (version in qm.FAMILIES[family].detected_on)
    dm = base.model.model.diffusion_model
    quantized = 0
    for name in qm.quantizable_linears(base.full.model.diffusion_model):
        module = dm.get_submodule(name)
        storage = base_weight.storage_of(module)
        if spec.loader == "gguf":
            kind = base.storage.get(name)
            if kind is not None:
                assert storage.label == f"GGUF {kind}", name
                quantized += 1
        elif spec.weight_dtype != "default":
            dtype = spec.weight_dtype.replace("fp8", "float8")
            assert module.weight.dtype == getattr(torch, dtype), name
            assert storage.label.startswith(dtype), storage.label
            quantized += 1
        elif storage.rounded:
            assert callable(getattr(module.weight, "dequantize", None)) or hasattr(module, "scale_weight")
            assert storage.grid is not None, storage.label
            quantized += 1
    assert quantized >= 5, f"only {quantized} quantized Linear layers"
    if spec.fmt == "Q4_K":
        assert "Q4_K" in base.storage.values()


@pytest.mark.parametrize("case", qm.params(qm.WITH_FLUX2))
def test_the_twin_samples_like_the_quantized_model(comfy, case):
    family, layout = case
    base = qm.load(family, layout)
    with torch.inference_mode():
        quantized = comfy_runtime.sample(base.model, family, steps=2, size=16)
        twin = comfy_runtime.sample(base.twin, family, steps=2, size=16)
        full = comfy_runtime.sample(base.full, family, steps=2, size=16)
    if qm.LAYOUTS[layout].exact(comfy.comfyui_version()):
        assert torch.equal(quantized, twin)
    else:
        assert _relative(quantized, twin) < INEXACT_TOL[layout]
    assert not torch.equal(twin, full), "the storage rounded nothing"


@pytest.mark.parametrize("case", qm.params(("flux",), layouts=("fp8_scaled_header", "gguf_q4_k")))
def test_the_twin_holds_the_dequantized_weights(comfy, base_weight, case):
    family, layout = case
    base = qm.load(family, layout)
    twin, full = base.twin.model.diffusion_model, base.full.model.diffusion_model
    for name in qm.quantizable_linears(full):
        expected = base_weight.parameter_value(base.model.model.diffusion_model.get_submodule(name))
        assert torch.equal(twin.get_submodule(name).weight, expected), name
        original = full.get_submodule(name).weight
        assert _relative(expected, original) < 0.1, name      # rounded, not garbage


def test_q4_k_blocks_round_trip_through_gguf_py():
    import gguf  # the runtime requirements install it
    rows = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32) * 0.05
    rows[1, :256] = 0.0                                         # an all-zero super-block
    blocks = quantized_files.q4_k_blocks(rows)
    assert blocks.shape == (4, 2 * 144)
    back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)
    assert back.shape == rows.shape
    assert np.all(back[1, :256] == 0)
    # Each value within one 4-bit step of its sub-block (range / 15, up to the 6-bit scale's rounding).
    sub = rows.reshape(4, -1, 32)
    step = (sub.max(-1) - np.minimum(sub.min(-1), 0)) / 15
    err = np.abs(back - rows).reshape(4, -1, 32).max(-1)
    assert np.all(err <= step * 1.1 + 1e-6)
