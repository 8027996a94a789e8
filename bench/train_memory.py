"""Peak training memory of every family at real size: a model computed on torch's meta device.

``predict(family, image=..., checkpointing=..., attention=..., device=...)`` gives the peak tensor
memory of a steady-state T-LoRA training step (AdamW's moments exist) and its parts, for any
family of the pack (its real config, its recipe's variant and rank on its attention layers, the
text length of :data:`TEXT_TOKENS`; Krea 2 and Anima need ComfyUI 0.33). Computed exactly from the
real module shapes (meta device, no weights), running the model as a training run does (ComfyUI's
training flags, the family's runtime fixes, ComfyUI's PyTorch attention in every model module):

- base weights (params x bytes of the base dtype) and the adapters' persistent state (fp32
  trainable factors, AdamW's two moments, the Ortho variants' frozen init: ``adapter_memory``);
- the step's Ortho factors ``[A; A - A0]``, ``[B S - B0 S0 | B0 S0]`` at the step's rank r(t)
  (``keep_rank``, default the full rank), their gradients and the parameters' gradients;
- what one training forward keeps for backward, by running the real model with the trainer's own
  adapter hook (``training.modules``) on meta tensors, each storage counted once however many
  ops save it: tensors saved outside checkpointed blocks, the block inputs a checkpoint keeps for
  its recomputation, and what attention saves (``attention="efficient"``: PyTorch's flash kernel,
  q, k, v, the output and the log-sum-exp, as the CPU's SDPA and the GPU's flash / memory-efficient
  kernels keep; ``"math"``: math SDPA, which keeps the softmax's attention matrices);
- the base weights that layers save for backward, where they are new memory: a layer computing
  on its resident weight in the compute dtype keeps a zero-copy alias of it
  (``training.layer_weights``: nothing new); a layer cast to the compute dtype per forward (an fp8
  or quantized base) keeps its cast, a streamed layer its private copy of its cast (``streamed``);
  ``copy_every_weight`` models the trainer before the aliases, which copied every weight per
  forward (what ``bench/measure_memory.py``'s first measurements ran);
- with checkpointing, the largest block's recomputation in backward (its saved tensors and
  weight copies, and its backward's working gradients: twice its largest saved tensor);
- on a CPU whose oneDNN has no bf16 (``device="cpu"``, :func:`cpu_conv_columns`), the columns
  PyTorch's slow convolution unfolds each non-1x1 convolution's input into, once in its forward
  and once in its backward (``C_in * kh * kw * H_out * W_out`` elements; a 3x3 convolution's are
  nine times its input), freed after each: a transient on top of what is kept at that point.

The peak is the largest of four moments of a step: the end of forward (state + factors + saved),
the largest recomputation in backward (what earlier blocks kept, the gradients of later blocks'
adapters, and that block's saved tensors and working gradients), the end of backward (state + factors +
their gradients + the parameters' gradients, built by the Ortho factors' backward at once) and
the optimizer step. Measured against real-size CPU runs by ``bench/measure_memory.py``.

Estimated, for ``device="gpu"`` only: the CUDA context and allocator slack (1 GiB).
``bench/fit_gpu.py`` builds on this model: ComfyUI's partial loading (resident and streamed
weights, offload buffers) for every family on 8-32 GB cards.

    python bench/train_memory.py  ->  bench/results/train_memory.json (git-ignored)
"""

from __future__ import annotations

import collections
import json
import logging
import sys
from collections.abc import Callable, Collection
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

import torch  # noqa: E402

import comfy_runtime  # noqa: E402

GIB = 2 ** 30
CONTEXT_OVERHEAD_GIB = 1.0   # CUDA context + allocator slack (GPU only): an estimate, not computed
COMPUTE_DTYPE = torch.bfloat16
# Text tokens of a training prompt as each family's text encoder hands them to the model in ComfyUI:
# CLIP's 77 (SDXL, SD 1.5), CLIP's 77 + T5's 77 (SD3), the 512 of FLUX.2's padding, Anima's
# adapter padding and T5's usual maximum (FLUX.1, Chroma; ComfyUI pads FLUX.1 to 256), and 256 for
# the LLM-encoded families, whose length follows the prompt (a long prompt: more than enough).
TEXT_TOKENS = {"sdxl": 77, "sd15": 77, "sd3": 154, "flux": 512, "chroma": 512, "flux2": 512,
               "anima": 512, "qwen_image": 256, "zimage": 256, "krea2": 256}
# The base dtype of ``predict``'s default run: the README's SDXL (bf16) and FLUX.1-dev (fp8) rows.
DEFAULT_BASE = {"flux": torch.float8_e4m3fn}
RECIPES = {f.id: (f.recipe.variant, f.recipe.rank, DEFAULT_BASE.get(f.id, torch.bfloat16),
                  TEXT_TOKENS.get(f.id, 256)) for f in comfy_runtime.families.all_families()}
"""family -> (variant, rank, base dtype, text tokens): the family's recipe at attention scope."""
ATTENTIONS = ("efficient", "math")
log = logging.getLogger("train_memory")


def _meta_inputs(family: str, image: int, tokens: int, config: dict):
    """The raw diffusion model's inputs at batch 1 on the meta device: a latent of the family's
    layout for an ``image`` x ``image`` picture, a mid-schedule timestep, ``tokens`` text tokens of
    the family's conditioning width, and its further inputs where it has them (``y``, guidance,
    the token count, Anima's T5 ids)."""
    from comfyui_tlora.tlora_core import families

    import family_configs

    spec, tiny = families.get(family), family_configs.TINY[family]
    side = image // spec.latent_downscale
    frames = (1,) * (spec.latent_ndim - 4)
    with torch.device("meta"):
        x = torch.empty(1, spec.latent_channels, *frames, side, side, dtype=COMPUTE_DTYPE)
        t = torch.tensor([500.0 if spec.timestep == "discrete" else 0.5])
        kwargs = {"context": torch.empty(1, tokens, spec.conditioning_widths(config)[0], dtype=COMPUTE_DTYPE)}
        if tiny.y_width is not None:   # SDXL / SD3 adm, FLUX.1 vector
            kwargs["y"] = torch.empty(1, config.get("adm_in_channels") or config["vec_in_dim"],
                                      dtype=COMPUTE_DTYPE)
        if tiny.guidance is not None:
            kwargs["guidance"] = torch.tensor([spec.recipe.training_guidance or 0.0])
        for name, value in tiny.extra_inputs(1, torch.Generator()).items():   # Anima's T5 ids
            kwargs[name] = torch.empty(1, tokens, *value.shape[2:], dtype=value.dtype)
    if tiny.tokens_input is not None:
        kwargs[tiny.tokens_input] = tokens
    return x, t, kwargs


def meta_model(family: str, config: dict | None = None, dtype: torch.dtype = COMPUTE_DTYPE,
               compute_dtype: torch.dtype | None = None):
    """ComfyUI's BaseModel of ``family`` at ``config`` (default: the family file's real config)
    on the meta device, weights in ``dtype``; ``compute_dtype`` other than ``dtype`` builds it as
    ComfyUI's loaders build an fp8 base (manual cast to the compute dtype)."""
    import comfy_runtime as runtime

    config = dict(config or runtime.real_config(family))
    model_config = runtime.family_model_config(family, config)
    model_config.set_inference_dtype(dtype, compute_dtype if compute_dtype not in (None, dtype) else None)
    with torch.device("meta"):
        return model_config.get_model({})


def _attach_meta_adapters(dm: torch.nn.Module, targets, width: int, ortho: bool) -> list[torch.Tensor]:
    """The trainer's own forward hook (``training.modules._training_hook``) on every target, with
    step factors of ``width`` columns as meta tensors (at batch 1 no per-sample mask applies)."""
    from comfyui_tlora.tlora_core.masks import RankState
    from comfyui_tlora.training.modules import TrainableAdapter, _training_hook

    factors, groups = [], collections.defaultdict(list)
    for t in targets:
        adapter = TrainableAdapter.__new__(TrainableAdapter)   # no init draw: its factors are set
        torch.nn.Module.__init__(adapter)
        adapter.target, adapter.variant, adapter.ortho = t, "tlora" if ortho else "vanilla", ortho
        down = torch.empty(width, t.in_features, device="meta", requires_grad=True)
        up = torch.empty(t.rows, width, device="meta", requires_grad=True)
        adapter.step_factors = (down, up)
        factors += [down, up]
        groups[t.module].append(adapter)
    state = RankState(strict=False)
    for name, group in groups.items():
        dm.get_submodule(name).register_forward_hook(_training_hook(group, state, None))
    return factors


def _efficient_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    # PyTorch's flash kernel (the CPU's SDPA; the GPU's keep the same tensors for backward).
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


class _MetaAutocast(torch.autocast):
    """``torch.autocast`` that takes ``device_type="meta"`` for the CPU's (a meta input's device
    type; Anima's text adapter turns autocast off around its rotary embedding)."""

    def __init__(self, device_type: str, *args, **kwargs) -> None:
        super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)


def cpu_conv_columns() -> bool:
    """Whether this CPU runs bf16 convolutions through PyTorch's slow path (``thnn_conv2d``,
    which holds the im2col columns as a tensor) because its oneDNN has no bf16 kernels (CPUs
    without AVX-512 / AMX bf16 support, e.g. AVX2-only ones); with oneDNN bf16 the convolution's
    scratch is oneDNN's own, outside PyTorch's allocator."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and supported is not None and supported())


def _conv_columns(module: torch.nn.Conv2d, x: torch.Tensor, out: torch.Tensor) -> int:
    """Bytes of the im2col columns the slow CPU convolution makes for one call (0 for a 1x1,
    stride-1, unpadded convolution, which reads its input as it is)."""
    if module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding in ((0, 0), "valid"):
        return 0
    kh, kw = module.kernel_size
    return out.shape[0] * x.shape[1] * kh * kw * out.shape[-2] * out.shape[-1] * x.element_size()


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s._cdata, s.nbytes()


def saved_bytes(family: str, *, image: int = 1024, checkpointing: bool = True, width: int = 128,
                ortho: bool = True, tokens: int | None = None, attention: str = "efficient",
                config: dict | None = None, scope: str = "attention",
                copied: Callable[[str], bool] = lambda layer: True) -> dict:
    """What one forward of the model with adapters keeps for backward (meta device), in bytes.

    Each storage counts once (several ops saving one tensor keep it once). ``activations``: saved
    outside attention; ``attention``: saved by the attention kernel; ``checkpoint_inputs``: block
    inputs kept for recomputation (not already saved); ``weight_elements``: elements of the base
    weights saved as copies (of the layers for which ``copied(name)`` holds; the others keep the
    weight itself, no new memory); ``blocks``:
    per checkpointed block, what it saves in order, as (bytes, 0, 0) or (0, weight elements, 0)
    (what its recomputation saves, when run without checkpointing) and, at each convolution,
    (0, 0, columns + its input's and output's bytes: its backward's transient); ``order``: per block
    in forward order, (name, bytes, weight elements) kept once it has run; ``block_factor_bytes``:
    the fp32 bytes of each block's adapter factors; ``conv_columns``: per convolution in forward
    order, (bytes, weight elements kept before it, its columns' bytes): see :func:`cpu_conv_columns`.
    """
    import comfy.ldm.modules.attention as attention_module
    import comfy.ops
    from comfyui_tlora.tlora_core import families
    from comfyui_tlora.training.prepare import (
        _install_checkpointing,
        _Restorer,
        checkpoint_blocks,
        comfy_training_flags,
    )
    from comfyui_tlora.training.runtime_fixes import runtime_fixes
    from comfyui_tlora.training.targets import find_targets

    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, not {attention!r}")
    config = dict(config or comfy_runtime.real_config(family))
    tokens = tokens or RECIPES[family][3]
    dm = meta_model(family, config).diffusion_model
    dm.requires_grad_(False)
    targets = find_targets(dm, family, scope)
    factors = _attach_meta_adapters(dm, targets, width, ortho)
    weights = {_storage(p)[0]: (p.numel(), name) for name, m in dm.named_modules()
               for p in m.parameters(recurse=False)}
    factor_ids = {_storage(f)[0] for f in factors}
    blocks = checkpoint_blocks(dm, families.get(family).checkpoint_blocks)
    where, in_attention = ["outside blocks"], [False]
    seen: set[int] = set()
    kept: list = []   # meta tensors cost nothing: holding them keeps storage ids unique
    totals, per_block, block_weights = collections.Counter(), collections.Counter(), collections.Counter()
    block_saves, block_factors = collections.defaultdict(list), collections.Counter()
    for t in targets:   # fp32 bytes of each block's adapter factors (their gradients: as much)
        owner = next((n for n in blocks if t.module.startswith(n + ".")), "outside blocks")
        block_factors[owner] += 4 * width * (t.rows + t.in_features)
    order: list[tuple[str, int, int]] = []

    def count(t: torch.Tensor, kind: str | None = None) -> None:
        sid, size = _storage(t)
        if sid in seen or sid in factor_ids:
            return
        seen.add(sid)
        kept.append(t)
        if sid in weights:
            elements = weights[sid][0] if copied(weights[sid][1]) else 0
            totals["weight_elements"] += elements
            block_weights[where[0]] += elements
            block_saves[where[0]].append((0, elements, 0))
            return
        kind = kind or ("attention" if in_attention[0] else "activations")
        totals[kind] += size
        if kind != "checkpoint_inputs":
            per_block[where[0]] += size
            block_saves[where[0]].append((size, 0, 0))

    def enter(module, args, kwargs, name):
        where[0] = name
        if checkpointing:
            for v in [*args, *kwargs.values()]:
                if torch.is_tensor(v):
                    count(v, "checkpoint_inputs")

    def leave(name):
        where[0] = "outside blocks"
        kept_bytes = totals["activations"] + totals["attention"] + totals["checkpoint_inputs"]
        order.append((name, kept_bytes, totals["weight_elements"]))

    conv_columns: list[tuple[int, int, int]] = []

    def conv_done(module, args, out):
        columns = _conv_columns(module, args[0], out)
        if columns:
            kept_bytes = totals["activations"] + totals["attention"] + totals["checkpoint_inputs"]
            conv_columns.append((kept_bytes, totals["weight_elements"], columns))
            block_saves[where[0]].append((0, 0, columns + args[0].nbytes + out.nbytes))

    for m in dm.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(conv_done)
    for name, m in blocks.items():
        m.register_forward_pre_hook(lambda mod, a, k, n=name: enter(mod, a, k, n), with_kwargs=True)
        m.register_forward_hook(lambda *_, n=name: leave(n))
    if checkpointing:
        _install_checkpointing(dm, _Restorer(), tuple(families.get(family).checkpoint_blocks))

    def attention_call(inner):
        def run(*a, **k):
            in_attention[0] = True
            try:
                return inner(*a, **k)
            finally:
                in_attention[0] = False
        return run

    x, t, kwargs = _meta_inputs(family, image, tokens, config)
    with ExitStack() as stack:
        # What a training run switches on (ComfyUI's training flags, the family's differentiable
        # ops), and ComfyUI's PyTorch attention with the chosen kernel (meta SDPA is the math one)
        # wherever a model module holds ComfyUI's attention function.
        stack.enter_context(comfy_training_flags())
        stack.enter_context(runtime_fixes(families.get(family)))
        stack.callback(setattr, torch, "autocast", torch.autocast)
        torch.autocast = _MetaAutocast
        wrapped = attention_call(attention_module.attention_pytorch)
        for module in [m for n, m in list(sys.modules.items()) if n.startswith("comfy.ldm") and m]:
            for attr in ("optimized_attention", "optimized_attention_masked"):
                if getattr(module, attr, None) is not None and callable(getattr(module, attr)):
                    stack.callback(setattr, module, attr, getattr(module, attr))
                    setattr(module, attr, wrapped)
        if attention == "efficient":
            old_sdpa = comfy.ops.scaled_dot_product_attention
            comfy.ops.scaled_dot_product_attention = _efficient_sdpa
            stack.callback(setattr, comfy.ops, "scaled_dot_product_attention", old_sdpa)
        else:   # as bench/measure_memory.py runs it
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(lambda v: (count(v), v)[1], lambda v: v))
        out = dm(x, t, **kwargs)
    count(out)   # the prediction, alive until the loss's backward
    names = (set(per_block) | set(block_weights)) - {"outside blocks"}
    return {"activations": totals["activations"], "attention": totals["attention"],
            "checkpoint_inputs": totals["checkpoint_inputs"], "weight_elements": totals["weight_elements"],
            "blocks": {k: block_saves[k] for k in sorted(names)},
            "order": order, "block_factor_bytes": dict(block_factors), "conv_columns": conv_columns}


def adapter_bytes(family: str, variant: str, rank: int, config: dict | None = None,
                  scope: str = "attention") -> dict:
    """The adapters' memory (``training.modules.adapter_memory``, the trainer's own figure)."""
    from comfyui_tlora.training.modules import ADAPTER_DTYPE, adapter_memory
    from comfyui_tlora.training.targets import find_targets

    dm = meta_model(family, config).diffusion_model
    targets = find_targets(dm, family, scope)
    need = adapter_memory(targets, variant, rank)
    return {"base_params": sum(p.numel() for p in dm.parameters()), "targets": len(targets),
            "trainable_params": need["trainable_params"], "state_bytes": need["state_bytes"],
            "grad_bytes": need["trainable_params"] * ADAPTER_DTYPE.itemsize,
            "step_factor_bytes": need["step_factor_bytes"]}


def predict(family: str = "sdxl", *, image: int = 1024, checkpointing: bool = True,
            attention: str = "efficient", device: str = "gpu", keep_rank: int | None = None,
            variant: str | None = None, rank: int | None = None,
            base_dtype: torch.dtype | None = None, tokens: int | None = None,
            config: dict | None = None, offload_bytes: int = 0, streamed: Collection[str] = (),
            copy_every_weight: bool = False) -> dict:
    """Peak tensor memory (GiB) of a steady-state training step and its parts (module docstring).

    Defaults: the family's recipe (``RECIPES``). ``keep_rank``: the step's r(t) (the factors are
    sliced to it); ``device="gpu"`` adds the CUDA context estimate; ``device="cpu"`` counts the slow
    convolution's columns where this CPU has them (:func:`cpu_conv_columns`). ``offload_bytes``:
    ComfyUI's casts of streamed layers in flight (:func:`training.memory.offload_buffers`), on top of
    the forward and the recomputation; ``streamed``: the layers that stream (their private copies
    are kept); ``copy_every_weight``: every layer keeps a copy (the trainer before zero-copy aliases).
    """
    r_variant, r_rank, r_dtype, r_tokens = RECIPES[family]
    variant, rank = variant or r_variant, rank or r_rank
    base_dtype, tokens = base_dtype or r_dtype, tokens or r_tokens
    keep = rank if keep_rank is None else keep_rank
    ortho = variant in ("tlora", "ortho")
    a = adapter_bytes(family, variant, rank, config)
    # A layer keeps a compute-dtype copy of its weight when it is cast per forward (a base in
    # another dtype, a streamed layer) or the trainer copies every weight; else a zero-copy alias.
    cast = copy_every_weight or base_dtype != COMPUTE_DTYPE
    streamed = frozenset(streamed)

    def copied(layer: str) -> bool:
        return cast or layer in streamed

    s = saved_bytes(family, image=image, checkpointing=checkpointing, width=2 * keep if ortho else keep,
                    ortho=ortho, tokens=tokens, attention=attention, config=config, copied=copied)
    copy_size = COMPUTE_DTYPE.itemsize
    base = a["base_params"] * torch.empty(0, dtype=base_dtype).element_size()
    persistent = a["state_bytes"] - a["grad_bytes"]       # factors, init, AdamW moments
    step_factors = a["step_factor_bytes"] / 2 * keep / rank   # the factors; as much again for grads
    saved = s["activations"] + s["attention"] + s["checkpoint_inputs"] + s["weight_elements"] * copy_size
    columns = device == "cpu" and cpu_conv_columns()
    # Forward: a convolution's columns come on top of what is kept when it runs.
    forward = max([saved] + [kept + elements * copy_size + c for kept, elements, c in s["conv_columns"]
                             if columns])
    recompute, largest, at_recompute, most = 0, None, 0, 0
    if checkpointing:
        # Backward re-runs each block with saving on (what the block saves without checkpointing),
        # then runs the block's backward, op by op in reverse: at the op that saved tensor j, what
        # the block saved up to j is alive, plus the gradient coming in and the one going out,
        # about twice tensor j's size (math attention: the gradients of the attention
        # probabilities and of the scores). By then what later blocks kept is freed and their
        # adapters' gradients have arrived.
        blocks = saved_bytes(family, image=image, checkpointing=False, width=2 * keep if ortho else keep,
                             ortho=ortho, tokens=tokens, attention=attention, config=config,
                             copied=copied)["blocks"]
        # Ortho: gradients of the step's factors; else of the parameters themselves (full rank).
        grads = {k: v * (1 if ortho else rank / keep) for k, v in s["block_factor_bytes"].items()}
        arrived = sum(v for k, v in grads.items() if k != "outside blocks")
        for name, kept_bytes, kept_weights in s["order"]:   # forward order: backward's reverse
            block = cumulative = 0
            for size, weight_elements, conv in blocks.get(name, ()):
                cumulative += size + weight_elements * copy_size
                block = max(block, cumulative + 2 * size + (conv if columns else 0))
            live = kept_bytes + kept_weights * copy_size + arrived + block
            most = max(most, block)
            if live > at_recompute:
                at_recompute, recompute, largest = live, block, name
            arrived -= grads.get(name, 0)
    moments = {
        "end_of_forward": forward + step_factors + offload_bytes,
        "largest_recompute": step_factors + at_recompute + offload_bytes,
        "end_of_backward": 2 * step_factors + a["grad_bytes"],
        "optimizer_step": a["grad_bytes"],
    }
    at = max(moments, key=moments.get)
    context = CONTEXT_OVERHEAD_GIB * GIB if device == "gpu" else 0
    peak = base + persistent + moments[at] + context
    return {"setting": {"family": family, "image": image, "checkpointing": checkpointing,
                        "attention": attention, "device": device, "keep_rank": keep,
                        "copy_every_weight": copy_every_weight, "streamed_layers": len(streamed),
                        "variant": variant, "rank": rank,
                        "base_dtype": str(base_dtype), "text_tokens": tokens},
            "base_params": a["base_params"], "targets": a["targets"],
            "trainable_params": a["trainable_params"],
            "base_gib": base / GIB, "adapter_state_gib": persistent / GIB,
            "adapter_grads_gib": a["grad_bytes"] / GIB, "step_factors_gib": step_factors / GIB,
            "saved_activations_gib": s["activations"] / GIB, "saved_attention_gib": s["attention"] / GIB,
            "checkpoint_inputs_gib": s["checkpoint_inputs"] / GIB,
            "saved_weight_copies_gib": s["weight_elements"] * copy_size / GIB,
            "recompute_gib": recompute / GIB, "largest_block": largest,
            "forward_saved_gib": saved / GIB, "largest_block_recompute_gib": most / GIB,
            "offload_gib": offload_bytes / GIB,
            "moments_gib": {k: (base + persistent + v) / GIB for k, v in moments.items()},
            "peak_at": at, "context_gib": context / GIB, "peak_gib": peak / GIB}


def main() -> None:
    comfy_runtime.bootstrap()   # first: ComfyUI sets up logging on import
    logging.basicConfig(format="%(message)s")
    logging.getLogger().setLevel(logging.WARNING)   # ComfyUI's own INFO lines stay quiet
    log.setLevel(logging.INFO)
    report = {}
    for family in RECIPES:
        for checkpointing in (True, False):
            p = predict(family, image=1024, checkpointing=checkpointing, device="gpu")
            report[f"{family}:1024:{'on' if checkpointing else 'off'}:gpu"] = p
            log.info("%s 1024 checkpointing %s: base %.2f + adapter state %.2f + grads %.2f GiB, "
                     "factors %.2f GiB (x2 in backward), saved %.2f activations + %.2f attention + "
                     "%.2f checkpoint inputs + %.2f weight copies GiB, recompute %.2f GiB; peak at %s "
                     "%.1f GiB (with %.1f GiB CUDA context)", family, "on" if checkpointing else "off",
                     p["base_gib"], p["adapter_state_gib"], p["adapter_grads_gib"], p["step_factors_gib"],
                     p["saved_activations_gib"], p["saved_attention_gib"], p["checkpoint_inputs_gib"],
                     p["saved_weight_copies_gib"], p["recompute_gib"], p["peak_at"], p["peak_gib"],
                     p["context_gib"])
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_memory.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
