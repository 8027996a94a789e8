"""The trainer under the behaviours newer ComfyUI switches on for training (ComfyUI's own trainer,
comfy_extras/nodes_train.py, is the reference): the process-wide training flags, the dynamic-VRAM
patcher, and cast paths that hand a layer a cached weight instead of a fresh copy.

Each test asserts on both runtimes: where a surface is absent (0.3.75), it asserts that the trainer
neither needs nor invents it.
"""

from __future__ import annotations

import pytest
import torch
import train_helpers as th

pytestmark = pytest.mark.comfy

FLAGS = ("in_training", "training_fp8_bwd")


def _flags():
    import comfy.model_management as mm

    return {name: getattr(mm, name) for name in FLAGS if hasattr(mm, name)}


@pytest.fixture
def flag_watch(pack):
    """Records ComfyUI's training flags at every model call of a training run."""
    import comfy.patcher_extension

    seen = []

    def record(executor, *args, **kwargs):
        seen.append(_flags())
        return executor(*args, **kwargs)

    def watch(model, key="test_flags"):
        watched = model.clone()
        watched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, record)
        return watched

    return watch, seen


def _same_adapters(a, b) -> bool:
    pairs = [(x, y) for name in a.weights.adapters for x, y in zip(a.weights.adapters[name], b.weights.adapters[name])]
    return bool(pairs) and set(a.weights.adapters) == set(b.weights.adapters) and all(
        torch.equal(x.up, y.up) and torch.equal(x.down, y.down) for x, y in pairs)


def _expected_during():
    from comfyui_tlora.training.prepare import TRAINING_FLAGS

    return {name: value for name, value in TRAINING_FLAGS.items() if name in _flags()}


def test_training_flags_hold_exactly_for_the_run(family, flag_watch, monkeypatch):
    import comfy.model_management as mm

    watch, seen = flag_watch
    present = set(_flags())
    # A value ComfyUI's own trainer can leave behind (its quantized_backward option).
    if "training_fp8_bwd" in present:
        monkeypatch.setattr(mm, "training_fp8_bwd", True)
    before = _flags()
    model, latents, positive = th.node_inputs(family)
    result = th.train(watch(model), latents, positive, rank=4, min_rank=2, steps=2)
    assert len(result.losses) == 2 and seen
    # The training clone's pre_run is paired with cleanup: the shared model points at no patcher.
    assert getattr(model.model, "current_patcher", None) is None
    assert all(flags == _expected_during() for flags in seen)
    assert _flags() == before
    if hasattr(mm, "in_training"):
        assert before["in_training"] is False and seen[0]["in_training"] is True
    else:
        # 0.3.75: no such switch; the trainer must not create one.
        assert present == set()


def _raise_in_forward(error: BaseException):
    def run(executor, *args, **kwargs):
        raise error

    return run


@pytest.mark.parametrize("failure", ["cancel", "nan", "oom", "exception"])
def test_training_flags_are_restored_on_every_exit(failure, monkeypatch):
    import comfy.model_management as mm
    import comfy.patcher_extension
    from comfyui_tlora.training import loop

    model, latents, positive = th.node_inputs("flux")
    failing = model.clone()
    if failure == "nan":
        failing.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_fail",
                                     lambda executor, *a, **k: executor(*a, **k) * float("nan"))
        expected = loop.TrainingDiverged
    else:
        error = {"cancel": mm.InterruptProcessingException(),
                 "oom": torch.OutOfMemoryError("CUDA out of memory (simulated)"),
                 "exception": ValueError("a layer failed")}[failure]
        failing.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_fail",
                                     _raise_in_forward(error))
        expected = type(error)
    if hasattr(mm, "training_fp8_bwd"):
        monkeypatch.setattr(mm, "training_fp8_bwd", True)
    before = _flags()
    snapshot = th.snapshot(model)
    with pytest.raises(expected):
        th.train(failing, latents, positive, rank=4, min_rank=2, steps=3)
    assert _flags() == before
    th.assert_restored(snapshot, model)


def test_flux_backward_needs_the_training_flag_where_comfyui_has_one(pack):
    """What the flag is for: with it off, newer ComfyUI's FLUX RoPE has no autograd formula."""
    import comfy.model_management as mm
    from comfyui_tlora.training import prepare

    model, latents, positive = th.node_inputs("flux")
    data = th.training_data(model, latents, positive)

    def one_backward():
        from comfyui_tlora.training.objective import NativePredictor, noisy_input_and_target

        x0, conds, _ = data.batch([0], torch.device("cpu"))
        sigma = torch.tensor([0.5])
        x_t, target = noisy_input_and_target(tp.model.model_sampling, x0, torch.randn(x0.shape), sigma)
        x_t.requires_grad_(True)
        pred = NativePredictor(tp)(x_t, sigma, conds)
        (pred - target).square().mean().backward()
        return x_t.grad

    with torch.inference_mode(False), torch.enable_grad(), prepare.trainable_model(
            model, gradient_checkpointing=True) as tp:
        assert torch.count_nonzero(one_backward()) > 0
        if hasattr(mm, "in_training"):
            mm.in_training = False
            try:
                with pytest.raises(RuntimeError, match="autograd"):
                    one_backward()
            finally:
                mm.in_training = True


def test_a_dynamic_vram_model_trains_on_its_non_dynamic_delegate(monkeypatch):
    """ComfyUI 0.33+ on a GPU hands nodes a dynamic-VRAM patcher; the trainer must train on the
    non-dynamic copy ComfyUI's loader makes of it, and get what training the plain model gives."""
    import comfy.model_patcher

    reference = th.train(th.node_inputs("sdxl")[0], *th.node_inputs("sdxl")[1:], rank=4, min_rank=2, steps=2)
    model, latents, positive = th.node_inputs("sdxl")
    if not hasattr(comfy.model_patcher.ModelPatcher, "is_dynamic"):
        # 0.3.75 has no dynamic patcher: a plain clone is the only path.
        assert "disable_dynamic" not in comfy.model_patcher.ModelPatcher.clone.__code__.co_varnames
        return
    delegates = []

    def loader(*args, disable_dynamic=False):
        # Stands in for a core loader's factory (cached_patcher_init): a fresh copy of the weights.
        assert disable_dynamic is True
        with torch.inference_mode():
            fresh = th.node_inputs("sdxl")[0]
        delegates.append(fresh)
        return fresh

    monkeypatch.setattr(type(model), "is_dynamic", lambda self: self is model or self.parent is model)
    model.cached_patcher_init = (loader, ())
    result = th.train(model, latents, positive, rank=4, min_rank=2, steps=2)
    assert len(delegates) == 1
    assert _same_adapters(result, reference) and result.losses == reference.losses


def test_a_dynamic_model_without_a_loader_factory_is_refused_clearly(monkeypatch):
    import comfy.model_patcher

    model, latents, positive = th.node_inputs("sdxl")
    if not hasattr(comfy.model_patcher.ModelPatcher, "is_dynamic"):
        assert not callable(getattr(model, "is_dynamic", None))
        return
    monkeypatch.setattr(type(model), "is_dynamic", lambda self: True)
    model.cached_patcher_init = None
    with pytest.raises(RuntimeError, match="dynamic VRAM.*--disable-dynamic-vram"):
        th.train(model, latents, positive, rank=4, min_rank=2, steps=1)


def test_a_cast_that_returns_a_cached_inference_weight_still_trains(monkeypatch):
    """A cast path that hands the layer its stored weight as it is (dynamic VRAM's cache does)
    must not reach autograd as an inference tensor."""
    import comfy.model_management as mm

    real_cast = mm.cast_to

    def cached_cast(weight, *args, copy=False, **kwargs):
        # No copy even when a weight function asks for one: the cached tensor itself.
        return real_cast(weight, *args, copy=False, **kwargs)

    model, latents, positive = th.node_inputs("sdxl")
    reference = th.train(model, latents, positive, rank=4, min_rank=2, steps=2)
    monkeypatch.setattr(mm, "cast_to", cached_cast)
    model, latents, positive = th.node_inputs("sdxl")
    result = th.train(model, latents, positive, rank=4, min_rank=2, steps=2)
    assert _same_adapters(result, reference) and result.losses == reference.losses
