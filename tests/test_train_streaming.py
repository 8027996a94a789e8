"""Training a model bigger than the device: ComfyUI's partial loading, streamed layers, the cap.

On a CPU, ComfyUI's ``load_models_gpu`` always loads fully; ``max_vram_gb`` makes the trainer trim
the load with ComfyUI's own ``partially_unload`` (its own choice of layers: the smallest stream),
so these tests run the same code path a user's capped GPU run does. What they check: the streamed
run trains exactly what a full load trains; a streamed layer's cast landing in buffers ComfyUI
reuses (its non-cudaMallocAsync path, simulated here) gives wrong gradients without the private
copy and exact ones with it; a validation sample in the middle of a streamed run changes nothing
and the run keeps streaming after it.
"""

from __future__ import annotations

import pytest
import torch
import train_helpers as th

pytestmark = pytest.mark.comfy

GIB = 2 ** 30
FAMILIES = ("sdxl", "flux", "qwen_image")
SETTINGS = dict(variant="tlora", rank=4, min_rank=2, steps=3, seed=0, learning_rate=1e-2,
                gradient_checkpointing=True)


@pytest.fixture(autouse=True)
def _runtime(comfy):
    """Every test here needs the bootstrapped ComfyUI."""


def _modules():
    from comfyui_tlora.training import loop, prepare, targets

    return loop, prepare, targets


def _half_the_weights_cap(model, config) -> float:
    """A max_vram_gb that leaves room for the working set and about 40% of the weights."""
    import comfy.model_management

    loop, _, targets = _modules()
    found = targets.find_targets(model.model.diffusion_model, th.family_id(model), config.scope)
    weights = sum(comfy.model_management.module_size(m) for m in model.model.diffusion_model.modules()
                  if hasattr(m, "weight_function") and isinstance(getattr(m, "weight", None), torch.Tensor))
    data = th.training_data(model, *th.node_inputs(th.family_id(model))[1:])
    need = loop.run_working_set(model, found, config, data, checkpointing=config.gradient_checkpointing)
    return (need.total + 0.4 * weights) / GIB


@pytest.fixture
def residencies(monkeypatch):
    """Every load the trainer makes: (Residency, streamed target layers, target layers); each load
    must leave the trainer's weight function on every layer (ComfyUI's loads wipe the functions
    set by hand; add_weight_wrapper's come back)."""
    _, prepare, targets = _modules()
    seen = []
    real_load = prepare.LoadPlan.load

    def load(plan, patcher):
        where = real_load(plan, patcher)
        dm = patcher.model.diffusion_model
        found = targets.find_targets(dm, th.family_id(patcher))
        modules = {t.module for t in found}
        streamed = sum(prepare.streams(dm.get_submodule(name)) for name in modules)
        unprotected = [n for n, m in dm.named_modules() if hasattr(m, "weight_function")
                       and isinstance(getattr(m, "weight", None), torch.Tensor)
                       and not any(isinstance(f, prepare.BackwardSafe) for f in m.weight_function)]
        assert not unprotected, f"layers without the trainer's weight function after a load: {unprotected[:3]}"
        seen.append((where, streamed, len(modules)))
        return where

    monkeypatch.setattr(prepare.LoadPlan, "load", load)
    return seen


def _train(family, **overrides):
    model, latents, positive = th.node_inputs(family)
    loop, _, _ = _modules()
    config = {**SETTINGS, **overrides}
    if config.pop("stream", False):
        config["max_vram_gb"] = _half_the_weights_cap(model, loop.TrainConfig(**config))
    before = th.snapshot(model)
    result = th.train(model, latents, positive, **config)
    th.assert_restored(before, model)
    return result


def _adapters(result) -> dict[str, torch.Tensor]:
    return {f"{name}.{i}.{part}": getattr(a, part) for name, group in result.weights.adapters.items()
            for i, a in enumerate(group) for part in ("down", "up")}


def _assert_equal_adapters(a, b) -> None:
    a, b = _adapters(a), _adapters(b)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_streamed_run_trains_exactly_what_a_full_load_trains(family, residencies):
    full = _train(family)
    assert residencies[-1][0].streamed_layers == 0
    streamed = _train(family, stream=True)
    where, streamed_targets, targets = residencies[-1]
    assert where.streamed_layers > 0 and streamed_targets >= targets / 2, residencies[-1]
    assert streamed.losses == full.losses
    _assert_equal_adapters(streamed, full)


def test_streaming_turns_gradient_checkpointing_on(residencies, caplog):
    caplog.set_level("INFO")
    _train("sdxl", stream=True, gradient_checkpointing=False)
    assert residencies[-1][0].streamed_layers > 0
    assert "gradient checkpointing on (weights stream)" in caplog.text
    assert "streamed per forward" in caplog.text


def test_a_cap_below_the_working_set_is_refused_before_loading(monkeypatch):
    import comfy.model_management

    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model for a run that cannot fit")

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", no_load)
    with pytest.raises(RuntimeError, match="working set alone .* is more than max_vram_gb"):
        _train("sdxl", max_vram_gb=1e-9)


@pytest.fixture
def reused_cast_buffers(monkeypatch):
    """ComfyUI's cast of a streamed layer lands in one of two buffers used in turn, as its
    per-stream cast buffers do without cudaMallocAsync (AMD, --disable-cuda-malloc): each cast
    overwrites the one of two layers before. Resident layers keep their fresh copies."""
    import comfy.model_management

    _, prepare, _ = _modules()
    real_cast_to = comfy.model_management.cast_to
    buffers: dict[torch.dtype, list[torch.Tensor]] = {}
    owners: dict[int, torch.nn.Module] = {}
    turn = [0]

    def cast_to(weight, *args, **kwargs):
        out = real_cast_to(weight, *args, **kwargs)
        owner = owners.get(id(weight))
        if owner is None or not prepare.streams(owner):
            return out
        pair = buffers.setdefault(out.dtype, [torch.empty(1 << 16, dtype=out.dtype) for _ in range(2)])
        view = pair[turn[0] % 2][:out.numel()].view(out.shape)
        turn[0] += 1
        view.copy_(out)
        return view

    def register(model) -> None:
        for module in model.model.diffusion_model.modules():
            if isinstance(getattr(module, "weight", None), torch.Tensor):
                owners[id(module.weight)] = module

    monkeypatch.setattr(comfy.model_management, "cast_to", cast_to)
    return register, turn


@pytest.mark.parametrize("family", ("sdxl", "flux"))
def test_reused_cast_buffers_need_the_private_copy(family, reused_cast_buffers, monkeypatch):
    register, turn = reused_cast_buffers
    _, prepare, _ = _modules()
    full = _train(family)
    model, latents, positive = th.node_inputs(family)
    register(model)
    loop, _, _ = _modules()
    cap = _half_the_weights_cap(model, loop.TrainConfig(**SETTINGS))
    protected = th.train(model, latents, positive, max_vram_gb=cap, **SETTINGS)
    assert turn[0] > 0, "no streamed cast went through the reused buffers"
    _assert_equal_adapters(protected, full)

    # The same run with the private copy of streamed casts switched off: autograd keeps views of
    # the reused buffers, and backward would replay earlier layers with later layers' weights.
    # Autograd notices where the overwritten view's version counter is checked ("modified by an
    # inplace operation"); where it is not (a checkpoint's recomputed tensors), the result is wrong.
    monkeypatch.setattr(prepare.BackwardSafe, "__call__",
                        lambda self, tensor: tensor.clone() if tensor.is_inference() else tensor)
    try:
        unprotected = th.train(model, latents, positive, max_vram_gb=cap, **SETTINGS)
    except RuntimeError as err:
        assert "modified by an inplace operation" in str(err)
    else:
        a, b = _adapters(unprotected), _adapters(full)
        assert any(not torch.equal(a[k], b[k]) for k in a), "the reused buffers did not corrupt gradients"


@pytest.mark.parametrize("family", ("sdxl", "flux"))
def test_resident_layers_compute_on_their_own_storage(family, monkeypatch):
    """Fully loaded, no layer's weight is copied per forward: every layer computes with a zero-copy
    alias of the MODEL's inference weight (same storage); streamed, the streamed layers are cast."""
    import comfy.model_management

    _, prepare, _ = _modules()
    casts = []
    real_cast_to = comfy.model_management.cast_to

    def cast_to(weight, *args, **kwargs):
        out = real_cast_to(weight, *args, **kwargs)
        # A parameter (not a conditioning) that came back in new memory: a copy.
        if isinstance(weight, torch.nn.Parameter) and \
                out.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            casts.append(weight)
        return out

    monkeypatch.setattr(comfy.model_management, "cast_to", cast_to)
    seen = []
    real_begin = prepare.TrainingLoad.load

    def load(self):
        where = real_begin(self)
        dm = self.patcher.model.diffusion_model
        seen.append({n: (m.weight.untyped_storage().data_ptr(), m.weight.is_inference(), list(m.weight_function))
                     for n, m in dm.named_modules() if prepare.is_comfy_op(m) and m.weight is not None})
        return where

    monkeypatch.setattr(prepare.TrainingLoad, "load", load)
    model, latents, positive = th.node_inputs(family)
    storage = {n: m.weight.untyped_storage().data_ptr() for n, m in model.model.diffusion_model.named_modules()
               if prepare.is_comfy_op(m) and m.weight is not None}
    th.train(model, latents, positive, **SETTINGS)
    assert casts == [], f"{len(casts)} weight copies in a fully loaded run"
    assert seen[-1].keys() == storage.keys()
    for name, (ptr, inference, functions) in seen[-1].items():
        assert ptr == storage[name] and not inference and not functions, name
    streamed = _train(family, stream=True)
    assert casts and all(torch.isfinite(torch.tensor(streamed.losses)))


def test_a_cap_only_the_checkpointed_working_set_fits_turns_checkpointing_on(caplog):
    """gradient_checkpointing off, and max_vram_gb between the working sets with and without it:
    the run trains with checkpointing (what the same run with it on trains), not a refusal."""
    loop, _, targets = _modules()
    model, latents, positive = th.node_inputs("sdxl")
    found = targets.find_targets(model.model.diffusion_model, "sdxl")
    data = th.training_data(model, latents, positive)
    config = loop.TrainConfig(**{**SETTINGS, "gradient_checkpointing": False})
    with_it = loop.run_working_set(model, found, config, data, True).total
    without = loop.run_working_set(model, found, config, data, False).total
    assert with_it < without
    cap = (with_it + without) / 2 / GIB
    caplog.set_level("INFO")
    capped = th.train(model, latents, positive, **{**SETTINGS, "gradient_checkpointing": False,
                                                   "max_vram_gb": cap})
    assert "gradient checkpointing on: without it the working set" in caplog.text
    plain = th.train(model, latents, positive, **SETTINGS)
    assert capped.losses == plain.losses
    _assert_equal_adapters(capped, plain)


@pytest.mark.parametrize("upstream", [False, True])
def test_a_compute_dtype_streams_and_leaves_no_cast_marks(upstream):
    """training_dtype bf16, or a compute dtype set upstream (ComfyUI's ModelComputeDtype node), on a
    streamed FLUX run: it trains (0.3.75's partially_unload once failed on forced casts) and leaves
    no layer of the shared model marked as cast or streamed (th.assert_restored)."""
    model, latents, positive = th.node_inputs("flux")
    if upstream:
        model = model.clone()
        model.set_model_compute_dtype(torch.bfloat16)
    loop, _, _ = _modules()
    settings = {**SETTINGS, "compute_dtype": "auto" if upstream else "bf16"}
    cap = _half_the_weights_cap(model, loop.TrainConfig(**settings))
    before = th.snapshot(model)
    result = th.train(model, latents, positive, max_vram_gb=cap, **settings)
    th.assert_restored(before, model)
    assert all(torch.isfinite(torch.tensor(result.losses)))
