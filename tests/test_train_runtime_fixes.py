"""The ops a family's training swaps for differentiable ones (``training.runtime_fixes``): Anima's
fused RMS norm + RoPE kernel, which has no backward and ignores ComfyUI's ``in_training``.

Evidence, on the runtime that has Anima (0.33; deselected where its model class is absent): the
kernel really blocks backward, the pure-torch replacement gives the kernel's output exactly, it is
in place for every model call of a run and the kernel is back after every exit.
"""

from __future__ import annotations

import sys

import pytest
import torch
import train_helpers as th

pytestmark = pytest.mark.comfy


def _kitchen():
    import comfy.quant_ops

    return comfy.quant_ops.ck


def _eager():
    from comfy_kitchen.backends.eager.rope import rms_rope_split_half

    return rms_rope_split_half


def test_every_fix_a_recipe_names_exists(pack):
    from comfyui_tlora.tlora_core import families
    from comfyui_tlora.training import runtime_fixes

    named = {fix for family in families.all_families() for fix in family.recipe.runtime_fixes}
    assert named and named <= set(runtime_fixes.FIXES)


@pytest.mark.parametrize("family", ["anima"])
def test_anima_backward_needs_the_eager_rope(family, pack):
    """With the kernel, backward fails even with ComfyUI's in_training set (inside the trainer's
    model preparation); with comfy_kitchen's eager op, every adapter target gets a gradient."""
    from comfyui_tlora.training import prepare
    from comfyui_tlora.training.objective import NativePredictor, noisy_input_and_target

    model, latents, positive = th.node_inputs(family)
    data = th.training_data(model, latents, positive)
    kitchen, kernel = _kitchen(), _kitchen().rms_rope_split_half

    def one_backward(tp):
        x0, conds, _ = data.batch([0], torch.device("cpu"))
        sigma = torch.tensor([0.5])
        x_t, target = noisy_input_and_target(tp.model.model_sampling, x0, torch.randn(x0.shape), sigma)
        x_t.requires_grad_(True)
        (NativePredictor(tp)(x_t, sigma, conds) - target).square().mean().backward()
        return x_t.grad

    with torch.inference_mode(False), torch.enable_grad(), prepare.trainable_model(
            model, gradient_checkpointing=False) as tp:
        assert kitchen.rms_rope_split_half is _eager()
        assert torch.count_nonzero(one_backward(tp)) > 0
        kitchen.rms_rope_split_half = kernel
        try:
            with pytest.raises(RuntimeError, match="autograd"):
                one_backward(tp)
        finally:
            kitchen.rms_rope_split_half = _eager()
    assert kitchen.rms_rope_split_half is kernel


@pytest.mark.parametrize("family", ["anima"])
def test_the_eager_rope_gives_the_kernels_output(family, pack):
    """The swap changes nothing but differentiability: the tiny Anima's prediction is bit-identical
    with either op (on this CPU runtime; the fused GPU kernels are not measured here)."""
    import loader_fixtures
    from comfyui_tlora.tlora_core import families
    from comfyui_tlora.training import runtime_fixes

    model = th.node_inputs(family)[0]
    x, kwargs = loader_fixtures.direct_inputs(family, batch=2)
    sigma = torch.tensor([0.8, 0.2])
    kernel = loader_fixtures.call_model(model, x, sigma, kwargs)
    with runtime_fixes.runtime_fixes(families.get(family)):
        assert _kitchen().rms_rope_split_half is _eager()
        eager = loader_fixtures.call_model(model, x, sigma, kwargs)
    assert torch.isfinite(kernel).all() and float(kernel.abs().max()) > 0
    assert torch.equal(kernel, eager)


@pytest.mark.parametrize("family", ["anima"])
@pytest.mark.parametrize("failure", [None, "cancel", "exception"])
def test_the_swap_holds_exactly_for_the_run(family, failure, pack):
    import comfy.model_management as mm
    import comfy.patcher_extension

    kitchen, kernel = _kitchen(), _kitchen().rms_rope_split_half
    seen = []
    error = {None: None, "cancel": mm.InterruptProcessingException(),
             "exception": ValueError("a layer failed")}[failure]

    def record(executor, *args, **kwargs):
        seen.append(kitchen.rms_rope_split_half is _eager())
        if error is not None and len(seen) == 2:
            raise error
        return executor(*args, **kwargs)

    model, latents, positive = th.node_inputs(family)
    watched = model.clone()
    watched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_swap", record)
    if error is None:
        result = th.train(watched, latents, positive, rank=4, min_rank=2, steps=2)
        assert len(result.losses) == 2 and all(map(torch.isfinite, map(torch.tensor, result.losses)))
    else:
        with pytest.raises(type(error)):
            th.train(watched, latents, positive, rank=4, min_rank=2, steps=3)
    assert seen and all(seen)
    assert kitchen.rms_rope_split_half is kernel


@pytest.mark.parametrize("family", ["anima"])
def test_a_comfy_kitchen_without_the_eager_op_is_refused_before_training(family, pack, monkeypatch):
    from comfyui_tlora.tlora_core import families
    from comfyui_tlora.training import runtime_fixes

    monkeypatch.setitem(sys.modules, "comfy_kitchen.backends.eager.rope", None)   # import fails
    with pytest.raises(RuntimeError, match="Anima's attention calls comfy_kitchen's rms_rope_split_half"):
        runtime_fixes.resolve(families.get(family))
    kernel = _kitchen().rms_rope_split_half
    with pytest.raises(RuntimeError, match="Update comfy_kitchen"):
        with runtime_fixes.runtime_fixes(families.get(family)):
            pass
    assert _kitchen().rms_rope_split_half is kernel
