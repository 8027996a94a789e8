"""The Loader on half-precision and fp8-stored bases, and with ComfyUI's low-VRAM weight casting.

The adapters' math runs in float32 and only the sum is cast to the base output's dtype
(tlora_core.adapter.add_delta), so:
- an Ortho T-LoRA at its init (trained factors == frozen copies) leaves every base bit-identical;
- on an fp8-stored base (manual cast to float32) the Loader's output is bit-identical to the same
  T-LoRA on a float32 model holding the same (fp8-rounded) weights, while merging the delta into
  the fp8 weights, as a weight-space loader does, destroys it;
- on fp16 / bf16 bases the Loader matches the hand-merged reference within the dtype's rounding.
"""

from __future__ import annotations

import importlib

import loader_fixtures as lf
import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def patch(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.patch")


POINTS = [0.95, 0.5, 0.1]   # noise levels (t / 1000) of the three samples of one batch


def loaded_call(patcher, family: str, sample: int | None = None) -> torch.Tensor:
    """One batched call at POINTS, or only sample ``sample`` of that batch, after loading."""
    import comfy.model_management as mm

    x, kwargs = lf.direct_inputs(family, batch=len(POINTS))
    sigmas = lf.sigmas_for(patcher, family, POINTS)
    if sample is not None:
        pick = slice(sample, sample + 1)
        x, sigmas, kwargs = x[pick], sigmas[pick], lf.sample_inputs(kwargs, pick)
    mm.load_models_gpu([patcher])
    return lf.call_model(patcher, x, sigmas, kwargs)


def per_sample(patcher, family: str) -> torch.Tensor:
    return torch.cat([loaded_call(patcher, family, i) for i in range(len(POINTS))])


def at_init(weights, pack):
    """The same T-LoRA with its trained factors reset to the frozen init: delta == 0 exactly."""
    adapter_mod = importlib.import_module(f"{pack.__name__}.tlora_core.adapter")
    adapters = {}
    for name, group in weights.adapters.items():
        adapters[name] = []
        for a in group:
            k = a.columns // 2
            down = torch.cat([a.down[k:], a.down[k:]])
            up = torch.cat([-a.up[:, k:], a.up[:, k:]], dim=1)
            adapters[name].append(adapter_mod.LowRankAdapter(down, up, a.rank_index, a.schedule, 2,
                                                             a.out_rows))
    return type(weights)(adapters, weights.architecture, weights.variant, weights.schedule, "test")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bases(comfy, patch, pack, family, dtype):
    base = comfy.build_model(family, dtype=dtype)
    weights, factors = lf.make_tlora(base, family, "tlora", rank=8, min_rank=2, scale=6.0)
    plain = loaded_call(base, family)

    untouched = base.clone()
    patch.install(untouched, at_init(weights, pack))
    assert torch.equal(loaded_call(untouched, family), plain)   # exact zero delta, any mask

    model = base.clone()
    patch.install(model, weights)
    got = loaded_call(model, family)
    reference = base.clone()
    lf.install_merged_reference(reference, [(factors, 1.0)], family)
    want = per_sample(reference, family)
    # Both round every layer output to the dtype (eps 2^-10 fp16, 2^-7 bf16); the merged one also
    # rounds W + delta. 8 eps of the output's magnitude bounds that through the tiny models
    # (measured 0.7-3.5 eps). The Loader must also be far closer to the reference than to the base.
    tol = 8 * torch.finfo(dtype).eps * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    assert (got - plain).norm() > 4 * (got - want).norm()


def test_fp8_stored_base_keeps_the_ortho_difference_exact(comfy, patch, family):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.fail("this torch has no float8_e4m3fn")
    state = comfy.build_model(family).model.diffusion_model.state_dict()
    fp8_state = {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}
    fp8 = lf.build_stored_as(family, torch.float8_e4m3fn, torch.float32, fp8_state)
    upcast = lf.build_stored_as(family, torch.float32, None,
                                {k: v.float() for k, v in fp8_state.items()})
    assert fp8.model.diffusion_model.get_submodule(
        next(iter(lf.target_layout(fp8, family)))).weight.dtype == torch.float8_e4m3fn
    assert torch.equal(loaded_call(fp8, family), loaded_call(upcast, family))   # same base math

    # A trained Ortho T-LoRA close to its init: the delta is much smaller than W (as after training)
    weights, factors = lf.make_tlora(fp8, family, "tlora", rank=8, min_rank=2, scale=0.0)
    fp8_model, upcast_model = fp8.clone(), upcast.clone()
    patch.install(fp8_model, weights)
    patch.install(upcast_model, weights)
    got = loaded_call(fp8_model, family)
    exact = loaded_call(upcast_model, family)
    assert torch.equal(got, exact)

    # Merging the same T-LoRA into the fp8 weights (a weight-space loader) loses much of it
    # (measured: 75-80% of the effect on the tiny SDXL / FLUX, ~48% on the tiny Chroma).
    merged = fp8.clone()
    lf.install_merged_reference(merged, [(factors, 1.0)], family)
    in_weights = per_sample(merged, family)
    effect = (exact - loaded_call(fp8, family)).abs().max()
    assert effect > 0 and (in_weights - exact).abs().max() > 0.3 * effect


def test_low_vram_cast_path_gives_the_same_outputs(comfy, patch, family):
    """Weights left on the offload device and cast in every forward (ComfyUI's lowvram mode):
    the hooks see the input on the compute device and the adapters follow it."""
    import comfy.model_management as mm

    base = comfy.build_model(family)
    weights, _ = lf.make_tlora(base, family, "tlora", rank=8, min_rank=2)
    model = base.clone()
    patch.install(model, weights)
    full = loaded_call(model, family)
    mm.unload_all_models()
    x, kwargs = lf.direct_inputs(family, batch=len(POINTS))
    model.patch_model(device_to=model.load_device, lowvram_model_memory=1)   # 1 byte: all offloaded
    try:
        casting = [m for m in model.model.modules() if getattr(m, "comfy_cast_weights", False)]
        assert model.model.model_lowvram and casting
        low = lf.call_model(model, x, lf.sigmas_for(model, family, POINTS), kwargs)
    finally:
        model.unpatch_model(model.offload_device)
    torch.testing.assert_close(low, full, rtol=0, atol=0)
    assert not any(m._forward_hooks for m in base.model.modules())


def test_inject_prepares_adapters_on_the_load_device(comfy, patch):
    """Adapters are copied once to the patcher's load device when it is injected, used from the
    cache by every forward, and dropped when the model is detached (no GPU here: meta device)."""
    base = comfy.build_model("sdxl")
    weights, _ = lf.make_tlora(base, "sdxl", "tlora")
    model = base.clone()
    holder = patch.install(model, weights)
    model.load_device = torch.device("meta")
    holder.inject(model)
    try:
        adapter = next(iter(weights.adapters.values()))[0]
        down, up, rank_index = adapter.tensors_on(torch.device("meta"))
        assert down.is_meta and up.is_meta and rank_index.is_meta
        assert adapter.down.device.type == "cpu"   # the original stays where the file put it
        assert adapter.tensors_on(torch.device("meta"))[0] is down   # cached, not copied again
    finally:
        holder.eject(model)
    holder.release(model, True)
    assert adapter._device_copies == {}
