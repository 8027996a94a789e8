"""T-LoRA Train on quantized bases as users load them (tests/quantized_models.py): classic fp8,
ComfyUI's mixed-precision layouts and GGUF, through ComfyUI's own loaders.

The precision decided for training's backward through a quantized layer: the trainer gives every
layer a weight function (``training.prepare.BackwardSafe``), so ComfyUI dequantizes the weight to
the compute dtype and the layer's forward and backward run in that dtype on the dequantized weight;
ComfyUI's fp8 backward (``training_fp8_bwd``) stays off for the run even when ComfyUI's own trainer
left it on. So training on a quantized base trains exactly what training on a float model holding
the dequantized weights trains, on every layout (int8 included: its quantized matmul is bypassed in
training), which the first test checks bit for bit.
"""

from __future__ import annotations

import pytest
import quantized_models as qm
import torch
import train_helpers as th
from test_train_sequences import run_sequence

import comfy_runtime

pytestmark = pytest.mark.comfy

INEXACT = {
    # ComfyUI 0.3.75's own scaled-fp8 Linear multiplies the input by the scale (F.linear(x * s, W))
    # where ours and the twin multiply the weight: the same product, rounded differently in float32.
    ("fp8_scaled_legacy", "0.3.75"),
}
"""(layout, ComfyUI version) pairs whose layer does other float32 arithmetic than a Linear on
the dequantized weight: there training matches the twin up to rounding (tolerances below)."""
SETTINGS = dict(variant="tlora", rank=4, min_rank=2, steps=3, seed=0, learning_rate=1e-2,
                gradient_checkpointing=True)


@pytest.fixture
def base(comfy, request):
    family, layout = request.param
    if qm.LAYOUTS[layout].loader == "gguf":
        qm.require_gguf()
    return qm.load(family, layout)


def _adapters(result) -> dict[str, torch.Tensor]:
    return {f"{name}.{i}.{part}": getattr(a, part) for name, group in result.weights.adapters.items()
            for i, a in enumerate(group) for part in ("down", "up")}


@pytest.mark.parametrize("base", qm.params(), indirect=True)
def test_training_on_a_quantized_base_trains_what_its_float_twin_trains(base, monkeypatch):
    import comfy.model_management as mm

    _, latents, positive = th.node_inputs(base.family)
    if hasattr(mm, "training_fp8_bwd"):
        # As ComfyUI's own trainer leaves it after a run with quantized_backward on.
        monkeypatch.setattr(mm, "training_fp8_bwd", True)
    quantized = th.train(base.model, latents, positive, **SETTINGS)
    if hasattr(mm, "training_fp8_bwd"):
        assert mm.training_fp8_bwd is True, "the run did not restore ComfyUI's flag"
    twin = th.train(base.twin, latents, positive, **SETTINGS)
    assert all(torch.isfinite(torch.tensor(quantized.losses)))
    a, b = _adapters(quantized), _adapters(twin)
    assert a.keys() == b.keys()
    if (base.layout, comfy_runtime.comfyui_version()) in INEXACT:
        torch.testing.assert_close(quantized.losses, twin.losses, rtol=1e-5, atol=0)
        for k in a:
            # AdamW divides by the gradient's running size, so float32 rounding in a gradient near 0
            # moves an element by up to a step's size times that rounding; 1e-5 is 1/3000 of the
            # 3 steps' largest move (learning rate 1e-2).
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    else:
        assert quantized.losses == twin.losses
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("base", qm.params(), indirect=True)
def test_a_streamed_run_on_a_quantized_base_equals_its_full_load(base):
    from comfyui_tlora.training import loop
    from test_train_streaming import _half_the_weights_cap

    _, latents, positive = th.node_inputs(base.family)
    full = th.train(base.model, latents, positive, **SETTINGS)
    cap = _half_the_weights_cap(base.model, loop.TrainConfig(**SETTINGS))
    streamed = th.train(base.model, latents, positive, max_vram_gb=cap, **SETTINGS)
    a, b = _adapters(streamed), _adapters(full)
    assert streamed.losses == full.losses
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("before", ["tlora", "stock"])
@pytest.mark.parametrize("base", qm.params(), indirect=True)
def test_loaders_train_and_the_base_afterwards_on_a_quantized_base(base, before, loras_dir,
                                                                   after_each_training):
    """The executor sequence of tests/test_train_sequences.py on the quantized MODEL; then the
    trained file, read by T-LoRA Loader onto the MODEL the Train node was given, gives the Train
    node's output MODEL."""
    import comfy.model_management
    from comfyui_tlora.nodes.loader import load_for_model

    import comfy_runtime

    executor = run_sequence(base.family, base.model, before, loras_dir, after_each_training,
                            trainable=base.full)
    trained = comfy_runtime.node_output(executor, "5")
    given = comfy_runtime.node_output(executor, {"tlora": "tl", "stock": "st"}[before])
    reread = th.apply(given, load_for_model(given, "first.safetensors"))
    _, latents, positive = th.node_inputs(base.family)
    data = th.training_data(base.model, latents, positive)
    from comfyui_tlora.training.objective import NativePredictor, objective_kind

    ms = base.model.model.model_sampling
    sigma = torch.tensor([0.5]) if objective_kind(ms) == "flow" else ms.sigmas[500:501]
    outputs = []
    for model in (trained, reread):
        # Loaded under inference mode, as ComfyUI's nodes load: outside it, ComfyUI's quantized
        # layers swap the shared weights for non-inference clones (the trap the trainer avoids).
        with torch.inference_mode():
            comfy.model_management.load_models_gpu([model])
            x0, conds, _ = data.batch([0], torch.device("cpu"))
            outputs.append(NativePredictor(model)(x0, sigma, conds))
    assert torch.equal(outputs[0], outputs[1])
