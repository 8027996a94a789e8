"""Test support for the T-LoRA Loader: random T-LoRAs on the tiny models, and the reference math.

``make_tlora`` builds a :class:`TLoRAWeights` for a tiny SDXL/FLUX ModelPatcher from raw factors
(Vanilla: A, B; Ortho: A, B, S and A_init, B_init, S_init) and keeps those factors, so the reference
can use the paper's formulas directly instead of the adapter code under test:

    Vanilla (Eq. 5):  W_t = W + s * B[:, :r] A[:r]
    Ortho   (Eq. 8):  W_t = W + s * (B[:, :r] S[:r] A[:r] - B_init[:, :r] S_init[:r] A_init[:r])

with ``r = int(((T - t) / T) ** power * (R - r_min)) + r_min`` in Python floats (the reference
code's formula) and ``t`` the training timestep of the call's sigma. ``merged_reference`` installs
an APPLY_MODEL wrapper that merges ``W_t`` into the weights by hand before every model call and
restores them afterwards: a sampler-side weight merge per step.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass

import torch

import comfy_runtime
import family_configs

T = 1000


@dataclass
class Factors:
    """Raw factors of one adapter, in float64 for the reference."""

    A: torch.Tensor                      # (r, in)
    B: torch.Tensor                      # (out, r)
    S: torch.Tensor | None = None        # (r,) Ortho only
    A_init: torch.Tensor | None = None
    B_init: torch.Tensor | None = None
    S_init: torch.Tensor | None = None
    out_rows: tuple[int, int] | None = None
    rank: int = 0
    min_rank: int = 0
    power: float = 1.0

    def delta(self, t: float) -> torch.Tensor:
        r = reference_rank(t, self.rank, self.min_rank, self.power)
        if self.S is None:
            return self.B[:, :r] @ self.A[:r]
        trained = self.B[:, :r] @ torch.diag(self.S[:r]) @ self.A[:r]
        frozen = self.B_init[:, :r] @ torch.diag(self.S_init[:r]) @ self.A_init[:r]
        return trained - frozen


def reference_rank(t: float, rank: int, min_rank: int, power: float = 1.0) -> int:
    return int(((T - t) / T) ** power * (rank - min_rank)) + min_rank


def target_layout(patcher, family: str) -> dict[str, list[tuple[int, int] | None]]:
    """Adapted modules of a tiny model and the output rows of each adapter on them.

    Every family but FLUX: its attention targets (SDXL: to_q/k/v/out.0 of attn1 and attn2, as the
    reference code). FLUX: fused qkv with three separate q/k/v adapters (img), one adapter over all rows (txt), the
    output projection, and q/k/v inside single_blocks' linear1 (which also holds the MLP rows).
    """
    dm = patcher.model.diffusion_model
    if family != "flux":   # every other family: its own attention targets
        layout: dict[str, list] = {}
        for t in comfy_runtime.family_spec(family).targets(inventory(patcher)):
            layout.setdefault(t.module, []).append(t.out_rows)
        return layout
    hidden = dm.hidden_size
    qkv = [(i * hidden, (i + 1) * hidden) for i in range(3)]
    layout: dict[str, list] = {}
    for i in range(len(dm.double_blocks)):
        layout[f"double_blocks.{i}.img_attn.qkv"] = qkv
        layout[f"double_blocks.{i}.txt_attn.qkv"] = [None]
        layout[f"double_blocks.{i}.img_attn.proj"] = [None]
    for i in range(len(dm.single_blocks)):
        layout[f"single_blocks.{i}.linear1"] = qkv
    return layout


def _frame(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


def make_tlora(patcher, family: str, variant: str = "tlora", rank: int = 8, min_rank: int = 2,
               power: float = 1.0, seed: int = 0, scale: float = 0.5):
    """(TLoRAWeights, {module: [Factors]}) with random factors whose delta is a visible fraction
    of the layer output. ``variant``: "tlora" (Ortho + mask) or "vanilla"."""
    pack = comfy_runtime.import_pack()
    from_adapter = pack.tlora_core.adapter
    weights_mod = pack.tlora_core.weights
    gen = torch.Generator().manual_seed(seed)
    schedule = from_adapter.RankSchedule(rank, min_rank, power, T)
    adapters, factors = {}, {}
    dm = patcher.model.diffusion_model
    for name, rows_list in target_layout(patcher, family).items():
        out_features, in_features = dm.get_submodule(name).weight.shape
        adapters[name], factors[name] = [], []
        for rows in rows_list:
            n = out_features if rows is None else rows[1] - rows[0]
            if variant == "vanilla":
                A = torch.randn(rank, in_features, generator=gen, dtype=torch.float64) / math.sqrt(in_features)
                B = scale * torch.randn(n, rank, generator=gen, dtype=torch.float64) / math.sqrt(rank)
                f = Factors(A, B)
                down, up, parts = A, B, 1
                rank_index = torch.arange(rank)
            else:
                A_init, B_init = _frame(in_features, rank, gen).T, _frame(n, rank, gen)
                S_init = torch.linspace(0.05, 0.02, rank, dtype=torch.float64)
                # trained = init + a perturbation: the Ortho difference is small, as after training
                A = A_init + 0.3 * torch.randn(A_init.shape, generator=gen, dtype=torch.float64) / math.sqrt(in_features)
                B = B_init + 0.3 * torch.randn(B_init.shape, generator=gen, dtype=torch.float64) / math.sqrt(rank)
                S = S_init + scale * torch.rand(rank, generator=gen, dtype=torch.float64)
                f = Factors(A, B, S, A_init, B_init, S_init)
                down = torch.cat([A, A_init])
                up = torch.cat([B * S, -B_init * S_init], dim=1)
                parts = 2
                rank_index = torch.cat([torch.arange(rank), torch.arange(rank)])
            f.out_rows, f.rank, f.min_rank, f.power = rows, rank, min_rank, power
            factors[name].append(f)
            adapters[name].append(from_adapter.LowRankAdapter(
                down.float(), up.float(), rank_index, schedule, parts, rows))
    weights = weights_mod.TLoRAWeights(adapters, family, "vanilla" if variant == "vanilla" else "tlora",
                                       schedule, "test")
    return weights, factors


def timestep_of(model_sampling, sigma: float, family: str) -> float:
    """The reference timestep: 1000*sigma on flow families (FLUX), the nearest training timestep on
    discrete ones (SDXL)."""
    if comfy_runtime.family_spec(family).timestep == "flow":
        return 1000.0 * sigma
    log_sigmas = model_sampling.sigmas.double().log()
    return float((log_sigmas - math.log(sigma)).abs().argmin())


def merged_weights(patcher, factor_sets: list[tuple[dict, float]], t: float, family: str) -> dict:
    """{module: W + sum_files strength * delta_t} computed in float64, in the weight's dtype."""
    dm = patcher.model.diffusion_model
    merged = {}
    for factors, strength in factor_sets:
        for name, group in factors.items():
            w = merged.get(name)
            if w is None:
                w = dm.get_submodule(name).weight.detach().to(torch.float64).clone()
            for f in group:
                start, stop = f.out_rows or (0, w.shape[0])
                w[start:stop] += strength * f.delta(t)
            merged[name] = w
    return merged


def install_merged_reference(patcher, factor_sets: list[tuple[dict, float]], family: str) -> None:
    """An APPLY_MODEL wrapper on ``patcher`` that merges ``W_t`` into the weights by hand before
    each model call and restores them after (every sample of a call must share one sigma)."""
    import comfy.patcher_extension

    def wrapper(executor, x, t, *args, **kwargs):
        sigmas = t.reshape(-1).double()
        assert bool((sigmas == sigmas[0]).all()), "the merged reference needs one sigma per call"
        ts = timestep_of(executor.class_obj.model_sampling, float(sigmas[0]), family)
        dm = executor.class_obj.diffusion_model
        backup = {}
        with torch.no_grad():
            for name, w in merged_weights(patcher, factor_sets, ts, family).items():
                param = dm.get_submodule(name).weight
                backup[name] = param.detach().clone()
                param.copy_(w.to(param.dtype))
        try:
            out = executor(x, t, *args, **kwargs)
        finally:
            with torch.no_grad():
                for name, w in backup.items():
                    dm.get_submodule(name).weight.copy_(w)
        return out

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_reference", wrapper)


def install_recorder(patcher, record: list) -> None:
    """Record (sigmas, raw diffusion-model output) of every model call of ``patcher``: the raw
    prediction is what the adapters change (the denoised latent is dominated by the input)."""
    import comfy.patcher_extension

    def wrapper(executor, x, t, *args, **kwargs):
        with raw_output(executor.class_obj) as captured:
            out = executor(x, t, *args, **kwargs)
        record.append((t.detach().clone(), captured[0].detach().clone()))
        return out

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_recorder", wrapper)


@contextlib.contextmanager
def raw_output(model):
    """Collects what ``model.diffusion_model`` returns while the block runs: a forward hook, as
    some model classes (SD3's MMDiT) run no DIFFUSION_MODEL wrappers."""
    captured: list = []
    hook = model.diffusion_model.register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        yield captured
    finally:
        hook.remove()


def direct_inputs(family: str, batch: int, seed: int = 3) -> tuple[torch.Tensor, dict]:
    """A latent and the keyword conditioning for calling ``BaseModel.apply_model`` directly."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(comfy_runtime.latent_shape(family, batch, 16), generator=gen)
    ctx, extra = family_configs.raw_inputs(family, batch, gen)
    return x, {"c_crossattn": ctx, **extra}


def sample_inputs(kwargs: dict, pick: slice) -> dict:
    """The keyword conditioning of ``direct_inputs`` for the samples ``pick`` of the batch: tensors
    sliced, constants (Z-Image's text token count) as they are, as ComfyUI's CONDConstant does."""
    return {k: v[pick] if torch.is_tensor(v) else v for k, v in kwargs.items()}


def call_model(patcher, x: torch.Tensor, sigma: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One ``apply_model`` call of ``patcher``'s model with ``patcher``'s wrappers, as a sampler
    makes it (the caller loads the patcher first). Returns the raw diffusion-model output (the
    prediction the adapters change), not the denoised latent."""
    import comfy.patcher_extension as ext

    options = {"wrappers": ext.copy_nested_dicts(patcher.wrappers)}
    with torch.no_grad(), raw_output(patcher.model) as captured:
        patcher.model.apply_model(x, sigma, transformer_options=options, **kwargs)
    return captured[0].float()


def inventory(patcher) -> dict[str, tuple[int, int]]:
    """``{module path: (out, in)}`` of the patcher's diffusion model (what the readers check)."""
    inventory = importlib.import_module(f"{comfy_runtime.PACK_NAME}.tlora_core.inventory")
    return inventory.inventory_from_module(patcher.model.diffusion_model)


def build_stored_as(family: str, weight_dtype: torch.dtype, compute_dtype: torch.dtype | None,
                    state_dict: dict[str, torch.Tensor]):
    """A tiny model whose weights are stored in ``weight_dtype`` and, with ``compute_dtype``, cast
    to it in every forward (ComfyUI's manual cast, as for fp8 checkpoints), loaded from
    ``state_dict``."""
    import comfy.model_management as mm
    import comfy.model_patcher

    config = comfy_runtime.family_model_config(family)
    config.set_inference_dtype(weight_dtype, compute_dtype)
    model = config.get_model({})
    model.diffusion_model.load_state_dict(state_dict, strict=True)
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def sigmas_for(patcher, family: str, points: list[float]) -> torch.Tensor:
    """Per-sample sigmas at the given noise fractions (timestep / 1000) of the model's schedule."""
    if comfy_runtime.family_spec(family).timestep == "flow":
        return torch.tensor(points, dtype=torch.float32)
    return patcher.model.model_sampling.sigmas[[int(p * 999) for p in points]].float()
