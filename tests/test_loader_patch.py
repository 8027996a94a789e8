"""The Loader's mechanism on the real ComfyUI runtime: per-call, per-sample rank masks in the
forward pass, exactly the hand-merged ``W + strength * delta(M_t)`` at every step.

Tolerance. The Loader computes ``W x + s * B (M (A x))`` and the reference ``(W + s B M A) x`` with
the merged weight rounded once to float32. Both are float32 sums of at most a few hundred products
per layer, so they agree to a few float32 ulps per layer (eps = 1.2e-7); through the tiny models'
layers and six sampling steps that stays below 2e-5 of the output's magnitude (measured: ~5e-7).
Each test also checks that getting the mask wrong (full rank, or the base model) would exceed the
tolerance by a wide margin, so the comparison can fail.

The sampled latent gets its own tolerance, LATENT_TOL: it carries the per-call differences through
CFG (x3 at cfg 2), every step and the latent format's scale (FLUX's 1 / 0.36, Wan 2.1's channel
std up to ~3 for Qwen-Image). Measured with heun on the tiny models: 1.8e-5 (FLUX.1), 2.3e-5
(Qwen-Image) of the latent's magnitude; euler ~2e-7. A full-rank mask moves the latent by ~1.5e-3
of it (flow families) and ~1.7e-4 (SDXL), still well above 4e-5.
"""

from __future__ import annotations

import copy

import loader_fixtures as lf
import pytest
import torch

pytestmark = pytest.mark.comfy

REL_TOL = 2e-5
LATENT_TOL = 4e-5


@pytest.fixture(scope="module")
def timesteps(pack):
    """The one timestep rule the Loader (and the trainer) uses."""
    import importlib

    return importlib.import_module(f"{pack.__name__}.training.timesteps")


@pytest.fixture(scope="module")
def patch(pack):
    import importlib

    return importlib.import_module(f"{pack.__name__}.nodes.patch")


def assert_calls_close(got: list, want: list) -> float:
    """Per-call raw outputs agree within REL_TOL of their magnitude; returns the tolerance used."""
    assert len(got) == len(want) > 0
    scale = max(out.abs().max().item() for _, out in want)
    tol = REL_TOL * scale
    for (s_got, a), (s_want, b) in zip(got, want):
        assert torch.equal(s_got, s_want)
        torch.testing.assert_close(a, b, rtol=0, atol=tol)
    return tol


def max_call_diff(a: list, b: list) -> float:
    return max((x - y).abs().max().item() for (_, x), (_, y) in zip(a, b))


def full_rank(factors: dict) -> dict:
    out = {k: [copy.copy(f) for f in v] for k, v in factors.items()}
    for group in out.values():
        for f in group:
            f.min_rank = f.rank
    return out


def run(model, family: str, **kw) -> tuple[torch.Tensor, list]:
    record: list = []
    clone = model.clone()
    lf.install_recorder(clone, record)
    latent = lf.comfy_runtime.sample(clone, family, size=16, **kw)
    return latent, record


@pytest.mark.parametrize("variant,sampler", [("tlora", "euler"), ("vanilla", "euler"),
                                             ("tlora", "heun"), ("vanilla", "dpmpp_2m")])
def test_sampling_equals_merged_reference_at_every_step(comfy, patch, family, variant, sampler):
    base = comfy.build_model(family)
    weights, factors = lf.make_tlora(base, family, variant, rank=8, min_rank=2)
    model = base.clone()
    holder = patch.install(model, weights, strength=1.0)
    reference = base.clone()
    lf.install_merged_reference(reference, [(factors, 1.0)], family)
    full = base.clone()
    lf.install_merged_reference(full, [(full_rank(factors), 1.0)], family)

    kw = dict(steps=4, cfg=2.0, sampler=sampler)   # cfg > 1: cond and uncond in one batch
    latent, got = run(model, family, **kw)
    ref_latent, want = run(reference, family, **kw)
    _, at_full_rank = run(full, family, **kw)
    _, plain = run(base, family, **kw)

    tol = assert_calls_close(got, want)
    assert holder.calls == len(got) and all(out.shape[0] == 2 for _, out in got)
    assert holder.state.timesteps is None   # cleared after every call
    latent_tol = LATENT_TOL * ref_latent.abs().max().item()
    torch.testing.assert_close(latent, ref_latent, rtol=0, atol=latent_tol)
    assert max_call_diff(got, at_full_rank) > 20 * tol   # the mask matters
    assert max_call_diff(got, plain) > 20 * tol          # the adapter matters


def rank_spy(patcher, holder, seen: list) -> None:
    """Record the active rank per sample while a model call runs (the state is set only then)."""
    import comfy.patcher_extension as ext

    def wrapper(executor, *args, **kwargs):
        seen.append(holder.state.active(holder.weights.schedule).tolist())
        return executor(*args, **kwargs)

    patcher.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, "spy", wrapper)   # every model runs these


def test_active_rank_follows_the_family_timestep_rule(comfy, patch, timesteps, family):
    """Per sample, the rank the Loader activates is r(t) at the family's timestep of its sigma:
    the discrete table's index (SD), 1000 * sigma (flow); the output is the merged reference."""
    import comfy.model_management as mm

    base = comfy.build_model(family)
    weights, factors = lf.make_tlora(base, family, "tlora", rank=8, min_rank=2)
    model = base.clone()
    holder = patch.install(model, weights)
    seen: list = []
    rank_spy(model, holder, seen)
    ms = model.model.model_sampling
    sigmas = lf.sigmas_for(base, family, [1.0, 0.5, 0.25, 0.0])
    steps = [lf.timestep_of(ms, float(s), family) for s in sigmas]
    assert timesteps.schedule_timesteps(ms, sigmas).tolist() == steps
    x, kwargs = lf.direct_inputs(family, batch=4)
    mm.load_models_gpu([model])
    out = lf.call_model(model, x, sigmas, kwargs)
    want = [lf.reference_rank(t, 8, 2) for t in steps]
    assert seen == [want] and want[0] < want[-1] == 8
    assert_per_sample_reference(comfy, base, [(factors, 1.0)], family, x, sigmas, kwargs, out)


def test_flux_rank_follows_1000_sigma(comfy, patch, timesteps):
    import comfy.model_management as mm

    base = comfy.build_model("flux")
    weights, factors = lf.make_tlora(base, "flux", "vanilla", rank=8, min_rank=2)
    model = base.clone()
    holder = patch.install(model, weights)
    seen: list = []
    rank_spy(model, holder, seen)
    sigmas = torch.tensor([1.0, 0.5, 0.25, 0.0])   # exact in float32
    ms = model.model.model_sampling
    assert timesteps.schedule_timesteps(ms, sigmas).tolist() == [1000.0, 500.0, 250.0, 0.0]
    assert ms.timestep(sigmas).tolist() == sigmas.tolist()   # why FLUX needs the 1000 factor

    x, kwargs = lf.direct_inputs("flux", batch=4)
    mm.load_models_gpu([model])
    out = lf.call_model(model, x, sigmas, kwargs)
    # r(t) = int((1000 - t) / 1000 * (8 - 2)) + 2 at t = 1000, 500, 250, 0
    assert seen == [[2, 5, 6, 8]]
    assert_per_sample_reference(comfy, base, [(factors, 1.0)], "flux", x, sigmas, kwargs, out)


def test_sdxl_rank_follows_the_discrete_timestep(comfy, patch, timesteps):
    import comfy.model_management as mm

    base = comfy.build_model("sdxl")
    weights, _ = lf.make_tlora(base, "sdxl", "tlora", rank=8, min_rank=4)
    model = base.clone()
    holder = patch.install(model, weights)
    seen: list = []
    rank_spy(model, holder, seen)
    ms = model.model.model_sampling
    sigmas = ms.sigmas[[999, 666, 333, 0]].float()
    assert timesteps.schedule_timesteps(ms, sigmas).tolist() == [999.0, 666.0, 333.0, 0.0]
    x, kwargs = lf.direct_inputs("sdxl", batch=4)
    mm.load_models_gpu([model])
    lf.call_model(model, x, sigmas, kwargs)
    want = [lf.reference_rank(t, 8, 4) for t in (999, 666, 333, 0)]
    assert seen == [want] and want == [4, 5, 6, 8]


def assert_per_sample_reference(comfy, base, factor_sets, family, x, sigmas, kwargs, out) -> None:
    """Each sample of a batched call equals the merged reference run on that sample alone."""
    import comfy.model_management as mm

    reference = base.clone()
    lf.install_merged_reference(reference, factor_sets, family)
    plain = base.clone()
    mm.load_models_gpu([reference])
    want = torch.cat([lf.call_model(reference, x[i:i + 1], sigmas[i:i + 1],
                                    lf.sample_inputs(kwargs, slice(i, i + 1)))
                      for i in range(len(sigmas))])
    mm.load_models_gpu([plain])
    without = lf.call_model(plain, x, sigmas, kwargs)
    tol = REL_TOL * want.abs().max().item()
    torch.testing.assert_close(out, want, rtol=0, atol=tol)
    assert (out - without).abs().max() > 20 * tol


@pytest.mark.parametrize("variant", ["tlora", "vanilla"])
def test_batch_samples_at_different_sigmas(comfy, patch, family, variant):
    import comfy.model_management as mm

    base = comfy.build_model(family)
    weights, factors = lf.make_tlora(base, family, variant, rank=8, min_rank=2, power=0.5)
    model = base.clone()
    patch.install(model, weights, strength=0.8)
    sigmas = lf.sigmas_for(base, family, [0.95, 0.5, 0.12])
    x, kwargs = lf.direct_inputs(family, batch=3)
    mm.load_models_gpu([model])
    out = lf.call_model(model, x, sigmas, kwargs)
    assert_per_sample_reference(comfy, base, [(factors, 0.8)], family, x, sigmas, kwargs, out)


def test_negative_strength(comfy, patch, family):
    import comfy.model_management as mm

    base = comfy.build_model(family)
    weights, factors = lf.make_tlora(base, family, "tlora", rank=4, min_rank=2)
    model = base.clone()
    patch.install(model, weights, strength=-0.7)
    sigmas = lf.sigmas_for(base, family, [0.7, 0.3])
    x, kwargs = lf.direct_inputs(family, batch=2)
    mm.load_models_gpu([model])
    out = lf.call_model(model, x, sigmas.float(), kwargs)
    assert_per_sample_reference(comfy, base, [(factors, -0.7)], family, x, sigmas.float(), kwargs, out)


def test_two_stacked_tloras_keep_their_own_schedules(comfy, patch, family):
    base = comfy.build_model(family)
    w1, f1 = lf.make_tlora(base, family, "tlora", rank=8, min_rank=2, power=1.0, seed=1)
    w2, f2 = lf.make_tlora(base, family, "vanilla", rank=6, min_rank=5, power=2.0, seed=2)
    first = base.clone()
    h1 = patch.install(first, w1, strength=0.9)
    second = first.clone()            # a second T-LoRA Loader after the first one
    h2 = patch.install(second, w2, strength=0.6)
    assert h1.key != h2.key and h1.state is not h2.state
    assert patch.installed(second) == [h1, h2] and patch.installed(first) == [h1]

    reference = base.clone()
    lf.install_merged_reference(reference, [(f1, 0.9), (f2, 0.6)], family)
    only_first = base.clone()
    lf.install_merged_reference(only_first, [(f1, 0.9)], family)
    same_schedule = base.clone()
    f2_like_f1 = {k: [copy.copy(f) for f in v] for k, v in f2.items()}
    for group in f2_like_f1.values():
        for f in group:
            f.min_rank, f.power = 2, 1.0
    lf.install_merged_reference(same_schedule, [(f1, 0.9), (f2_like_f1, 0.6)], family)

    _, got = run(second, family, steps=4, cfg=2.0)
    _, want = run(reference, family, steps=4, cfg=2.0)
    _, first_only = run(only_first, family, steps=4, cfg=2.0)
    _, shared = run(same_schedule, family, steps=4, cfg=2.0)
    tol = assert_calls_close(got, want)
    assert max_call_diff(got, first_only) > 20 * tol
    assert max_call_diff(got, shared) > 20 * tol     # a shared (global) schedule would be wrong
    # the first Loader's output is unaffected by the second
    _, got_first = run(first, family, steps=4, cfg=2.0)
    assert_calls_close(got_first, first_only)


def stock_lora(comfy, patcher, rank: int = 4, seed: int = 7, strength: float = 0.8):
    """``patcher`` with an ordinary LoRA on every adapted module, through ComfyUI's own
    LoRA loading (sd.load_lora_for_models, what LoraLoaderModelOnly calls)."""
    import comfy.lora as lora_mod
    import comfy.sd as sd
    import comfy.utils as utils

    key_map = lora_mod.model_lora_keys_unet(patcher.model, {})
    gen = torch.Generator().manual_seed(seed)
    lora, done = {}, set()
    for lora_key, weight_key in key_map.items():
        # A tuple names rows of a fused weight (newer ComfyUI's diffusers aliases); the whole
        # weight has its own name in the map.
        # Attention layers are spelled attn (UNets, FLUX, SD3) or attention (Z-Image).
        if not lora_key.startswith("lora_unet_") or not ("attn" in lora_key or "attention" in lora_key) \
                or not isinstance(weight_key, str) or weight_key in done:
            continue
        done.add(weight_key)   # the key map has several names (LDM, diffusers) per weight
        weight = utils.get_attr(patcher.model, weight_key)
        if weight.ndim != 2:
            continue   # newer ComfyUI also maps the attention's norm scales
        out_f, in_f = weight.shape
        lora[f"{lora_key}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
        lora[f"{lora_key}.lora_up.weight"] = 0.3 * torch.randn(out_f, rank, generator=gen) / rank ** 0.5
        lora[f"{lora_key}.alpha"] = torch.tensor(float(rank))
    assert lora, "no LoRA keys for this model"
    model, _ = sd.load_lora_for_models(patcher, None, lora, strength, 0)
    return model


@pytest.mark.parametrize("order", ["tlora_after_stock", "stock_after_tlora"])
def test_tlora_composes_with_a_stock_lora(comfy, patch, family, order):
    base = comfy.build_model(family)
    weights, factors = lf.make_tlora(base, family, "tlora", rank=8, min_rank=2)
    if order == "tlora_after_stock":
        model = stock_lora(comfy, base).clone()
        patch.install(model, weights)
    else:
        model = base.clone()
        patch.install(model, weights)
        model = stock_lora(comfy, model)
    # reference: the stock LoRA merged by ComfyUI, the T-LoRA merged by hand on top of it
    reference = stock_lora(comfy, base)
    lf.install_merged_reference(reference, [(factors, 1.0)], family)
    stock_only = stock_lora(comfy, base)

    _, got = run(model, family, steps=4, cfg=2.0)
    _, want = run(reference, family, steps=4, cfg=2.0)
    _, without_tlora = run(stock_only, family, steps=4, cfg=2.0)
    _, plain = run(base, family, steps=4, cfg=2.0)
    tol = assert_calls_close(got, want)
    assert max_call_diff(got, without_tlora) > 20 * tol
    assert max_call_diff(without_tlora, plain) > 20 * tol


def test_strength_zero_is_bit_identical_to_base(comfy, patch, family):
    base = comfy.build_model(family)
    weights, _ = lf.make_tlora(base, family, "tlora")
    model = base.clone()
    patch.install(model, weights, strength=0.0)
    latent, got = run(model, family, steps=3, cfg=2.0)
    base_latent, want = run(base, family, steps=3, cfg=2.0)
    assert torch.equal(latent, base_latent)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))


def hooked_modules(patcher) -> list[str]:
    return [name for name, m in patcher.model.named_modules() if m._forward_hooks]


def test_base_model_is_bit_identical_after_sampling(comfy, patch, family):
    import comfy.model_management as mm

    base = comfy.build_model(family)
    x, kwargs = lf.direct_inputs(family, batch=2)
    sigmas = lf.sigmas_for(base, family, [0.9, 0.2])
    mm.load_models_gpu([base])
    before = lf.call_model(base, x, sigmas.float(), kwargs)
    state_before = {k: v.clone() for k, v in base.model.state_dict().items()}

    model = base.clone()
    weights, _ = lf.make_tlora(base, family, "tlora")
    patch.install(model, weights)
    lf.comfy_runtime.sample(model, family, steps=3, cfg=2.0)
    assert hooked_modules(model)                 # still loaded: hooks in place
    mm.load_models_gpu([base])   # ComfyUI ejects the clone
    assert hooked_modules(base) == []
    after = lf.call_model(base, x, sigmas.float(), kwargs)
    assert torch.equal(before, after)
    assert all(torch.equal(v, state_before[k]) for k, v in base.model.state_dict().items())
    # and after an explicit unload of the patched clone
    mm.load_models_gpu([model])
    model.detach()
    assert hooked_modules(base) == []
    assert torch.equal(lf.call_model(base, x, sigmas.float(), kwargs), before)


def test_hooks_are_registered_exactly_once(comfy, patch):
    import comfy.model_management as mm

    base = comfy.build_model("sdxl")
    weights, _ = lf.make_tlora(base, "sdxl", "tlora")
    model = base.clone()
    holder = patch.install(model, weights)
    target = next(iter(weights.adapters))
    module = model.model.diffusion_model.get_submodule(target)
    copy_of_model = model.clone()            # shares the holder, as a downstream node's clone
    for patcher in (model, model, copy_of_model, model):
        lf.comfy_runtime.sample(patcher, "sdxl", steps=2)
        mm.load_models_gpu([patcher])   # partially_load: eject + inject again
        assert len(module._forward_hooks) == 1
        assert list(holder.handles) == [id(model.model)]
        assert len(holder.handles[id(model.model)]) == len(weights.adapters)
    model.unpatch_model()
    assert len(module._forward_hooks) == 0 and holder.handles == {}


def test_a_clone_with_its_own_model_gets_its_own_hooks(comfy, patch):
    """A clone that carries another model object (ComfyUI's non-dynamic delegate of a dynamic-VRAM
    model, the copy T-LoRA Train trains on) shares the holder but needs hooks on its own model."""
    base = comfy.build_model("sdxl")
    weights, _ = lf.make_tlora(base, "sdxl", "tlora")
    model = base.clone()
    holder = patch.install(model, weights)
    want = lf.comfy_runtime.sample(model, "sdxl", steps=3)          # injects into model.model
    other = comfy.build_model("sdxl")                                # same seeded weights, own object
    delegate = model.clone()
    delegate.model = other.model
    delegate.is_injected = False
    got = lf.comfy_runtime.sample(delegate, "sdxl", steps=3)
    assert set(holder.handles) == {id(model.model), id(other.model)}
    assert torch.equal(got, want)
    assert not torch.equal(got, lf.comfy_runtime.sample(other, "sdxl", steps=3))   # the T-LoRA acts
    delegate.unpatch_model()
    assert set(holder.handles) == {id(model.model)}


def test_install_validates_before_touching_the_model(comfy, patch, pack):
    base = comfy.build_model("sdxl")
    weights, _ = lf.make_tlora(base, "sdxl", "tlora")
    name = next(iter(weights.adapters))
    bad = pack.tlora_core.weights.TLoRAWeights(
        {**weights.adapters, "input_blocks.99.1.attn1.to_q": weights.adapters[name]},
        "sdxl", "tlora", weights.schedule, "test")
    model = base.clone()
    with pytest.raises(ValueError, match="input_blocks.99.1.attn1.to_q: no such module"):
        patch.install(model, bad)
    wrong_shape = pack.tlora_core.weights.TLoRAWeights(
        {"input_blocks.3.1.transformer_blocks.0.attn2.to_k": weights.adapters[name]},
        "sdxl", "tlora", weights.schedule, "test")
    with pytest.raises(ValueError, match=r"layer is \(64 x 32\)"):
        patch.install(model, wrong_shape)
    assert model.injections == {} and patch.installed(model) == []
    assert not model.wrappers.get("apply_model")


def test_unsupported_model_sampling_is_refused(comfy, timesteps):
    import comfy.model_sampling as ms

    class Continuous(ms.ModelSamplingContinuousEDM, ms.EDM):
        pass

    with pytest.raises(ValueError, match="ModelSamplingContinuousEDM"):
        timesteps.timestep_rule(Continuous())
