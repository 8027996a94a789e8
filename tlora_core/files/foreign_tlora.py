"""Readers for the T-LoRA files other tools write: the reference code's, and LyCORIS's.

- T-LoRA reference code, SDXL (``pytorch_lora_weights.safetensors``), keys
  ``<diffusers attention processor>.{to_q,to_k,to_v,to_out}_lora.<param>``. Ortho (paper Eq. 8)::

      y = W x + p(q(x) * lambda * m) - base_p(base_q(x) * base_lambda * m)

  -> ``parts = 2``, ``down = [q; base_q]``, ``up = [p * lambda | -base_p * base_lambda]``.
  Vanilla (Eq. 5): ``y = W x + up(down(x) * m)``. No scale anywhere (the processors get scale 1).
- T-LoRA reference code, FLUX (``lora.pt``, or the same keys in safetensors): vanilla only, keys
  ``{transformer_blocks,single_transformer_blocks}.N.attn.processor.<proj>_lora.{down,up}.weight``;
  q / k / v (and the context projections ``to_{q,k,v}_proj`` = ``add_{q,k,v}_proj``) land on rows
  of FLUX's fused ``qkv`` / ``linear1``. The single blocks' ``to_out`` / ``to_*_proj`` adapters
  exist in the file but the reference forward never calls them: skipped and reported.
- LyCORIS ``tlora``: ``lycoris_<diffusers name with _>.{q_layer.weight,p_layer.weight,lambda_layer,
  alpha}``, ``y = W x + alpha/r * (P diag(lambda m) Q - P0 diag(lambda0 m) Q0) x``. P0, Q0, lambda0
  are not stored; LyCORIS recomputes them on load as the top-r SVD of the current base weight
  (its default ``sig_type="principal"`` init), and so does :func:`read_lycoris`.

These files carry no schedule: ``min_rank`` / ``power`` come from the caller (default
:func:`tlora_core.schedule.default_min_rank`, recorded as a warning, and power 1).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping

import torch

from ..families import Family
from ..inventory import Inventory, Target
from ..weights import TLoRAWeights
from .check import TLoRAFileError
from .collect import AdapterCollector, as_f32, pair_factors
from .names import strip_prefix

REFERENCE_HINT = (" The reference code's recipes use min_rank 32 of rank 64 (SDXL) and 1 of 32 "
                  "(FLUX); its hparams.yml records the value a file was trained with.")
REF_SDXL_KEY = re.compile(
    r"^(?:unet\.)?(?P<proc>(?:(?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)"
    r"\.transformer_blocks\.\d+\.attn[12])\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\."
    r"(?P<param>q_layer\.weight|p_layer\.weight|lambda_layer|base_q\.weight|base_p\.weight|"
    r"base_lambda|down\.weight|up\.weight)$")
REF_FLUX_KEY = re.compile(
    r"^(?:transformer\.)?(?P<block>(?:single_)?transformer_blocks\.\d+)\.attn\.processor\."
    r"(?P<proj>to_q|to_k|to_v|to_out|to_q_proj|to_k_proj|to_v_proj)_lora\.(?P<param>down|up)\.weight$")
LYCORIS_TLORA_KEY = re.compile(r"^lycoris_(?P<name>.+?)\.(?P<param>q_layer\.weight|p_layer\.weight|"
                               r"lambda_layer|alpha)$")
ORTHO_PARAMS = frozenset({"q_layer.weight", "p_layer.weight", "lambda_layer", "base_q.weight",
                          "base_p.weight", "base_lambda"})
VANILLA_PARAMS = frozenset({"down.weight", "up.weight"})
FLUX_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0",
             "to_q_proj": "add_q_proj", "to_k_proj": "add_k_proj", "to_v_proj": "add_v_proj"}
LYCORIS_WARNING = (
    "LyCORIS T-LoRA files do not store the frozen base factors (P0, lambda0, Q0) that the adapter "
    "subtracts; they were recomputed here, as LyCORIS itself does on load, as the top-{rank} SVD "
    "of this model's base weights. That is exact only for LyCORIS's default init "
    "(sig_type='principal', use_data_init=True) and only if these base weights are bit-identical "
    "to those the training started from (e.g. fp32 then and now): a base held in another "
    "precision (bf16/fp16/fp8) moves the recomputed factors (about 2% error), and a file trained "
    "with another init ('last', 'middle', or a random matrix) gives a wrong result.")


def _reference_ortho_pair(params: Mapping[str, torch.Tensor], where: str, source: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of the reference Ortho layer ``p(q x * lambda m) - base_p(base_q x * base_lambda m)``."""
    q, p, lam = (as_f32(params[k]) for k in ("q_layer.weight", "p_layer.weight", "lambda_layer"))
    q0, p0, lam0 = (as_f32(params[k]) for k in ("base_q.weight", "base_p.weight", "base_lambda"))
    r = q.shape[0]
    if not (q.ndim == p.ndim == 2 and p.shape[1] == r and lam.numel() == r
            and q0.shape == q.shape and p0.shape == p.shape and lam0.numel() == r):
        raise TLoRAFileError(
            f"{source}: inconsistent shapes in '{where}': q_layer {tuple(q.shape)}, p_layer "
            f"{tuple(p.shape)}, lambda_layer {tuple(lam.shape)}, base_q {tuple(q0.shape)}, "
            f"base_p {tuple(p0.shape)}, base_lambda {tuple(lam0.shape)} (need q (r, in), "
            "p (out, r), lambda (1, r), the base_* alike).")
    return torch.cat([q, q0]), torch.cat([p * lam.reshape(1, r), -(p0 * lam0.reshape(1, r))], dim=1)


def _reference_groups(b: AdapterCollector, sd: Mapping[str, torch.Tensor], pattern: re.Pattern,
                      what: str, by: tuple[str, str], skip: Callable[[re.Match], str | None] | None = None
                      ) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """The file's tensors grouped by layer (the ``by`` groups of ``pattern``) and parameter;
    keys that do not match, or that ``skip`` names a reason for, are recorded as skipped."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in sd.items():
        m = pattern.match(key)
        reason = f"not a T-LoRA reference-code {what} key" if m is None else skip(m) if skip else None
        if reason:
            b.skip(reason, key)
        else:
            groups[(m[by[0]], m[by[1]])][m["param"]] = tensor
    return groups


def read_reference_sdxl(sd: Mapping[str, torch.Tensor], inventory: Inventory, *,
                        min_rank: float | None = None, power: float | None = None,
                        source: str = "file", family: Family | None = None) -> TLoRAWeights:
    """Read the T-LoRA reference code's SDXL file (Ortho or vanilla; see the module docstring)."""
    b = AdapterCollector(inventory, source, REFERENCE_HINT, family)
    groups = _reference_groups(b, sd, REF_SDXL_KEY, "SDXL", ("proc", "proj"))
    kinds = set()
    for (proc, proj), params in groups.items():
        where = f"{proc}.processor.{proj}_lora"
        kind = "ortho" if set(params) == ORTHO_PARAMS else "vanilla" if set(params) == VANILLA_PARAMS \
            else None
        if kind is None:
            raise TLoRAFileError(
                f"{source}: layer '{where}' has {sorted(params)}; a reference T-LoRA layer has "
                f"{sorted(ORTHO_PARAMS)} (Ortho) or {sorted(VANILLA_PARAMS)} (vanilla).")
        kinds.add(kind)
        name = f"{proc}.{'to_out.0' if proj == 'to_out' else proj}"
        target = b.resolve(name, where)
        if target is None:
            continue
        down, up = (_reference_ortho_pair(params, where, source) if kind == "ortho" else
                    pair_factors(params["down.weight"], params["up.weight"], where, source))
        parts = 2 if kind == "ortho" else 1
        b.add(target, name, down, up, parts=parts, schedule=b.schedule(down.shape[0] // parts,
                                                                     min_rank, power))
    if len(kinds) > 1:
        raise TLoRAFileError(f"{source}: mixes Ortho (q_layer/p_layer/lambda_layer) and vanilla "
                             "(down/up) layers; a reference T-LoRA file holds one kind.")
    if kinds == {"vanilla"}:
        b.warnings.append(
            f"{source}: read as a vanilla T-LoRA of the reference code (rank-masked). Old "
            "diffusers attention-processor LoRAs use the same keys; if this file is a plain "
            "LoRA, load it as one (no rank schedule).")
    return b.finish(sd, "tlora" if kinds == {"ortho"} else "vanilla", "reference-sdxl")


def read_reference_flux(sd: Mapping[str, torch.Tensor], inventory: Inventory, *,
                        min_rank: float | None = None, power: float | None = None,
                        source: str = "file", family: Family | None = None) -> TLoRAWeights:
    """Read the T-LoRA reference code's FLUX ``lora.pt`` keys (vanilla T-LoRA on fused rows)."""
    b = AdapterCollector(inventory, source, REFERENCE_HINT, family)

    def never_applied(m: re.Match) -> str | None:
        if m["block"].startswith("single_") and m["proj"] not in ("to_q", "to_k", "to_v"):
            return ("single-block adapters the reference code creates but never applies "
                    "(its single blocks have no output or context projection)")
        return None

    groups = _reference_groups(b, sd, REF_FLUX_KEY, "FLUX", ("block", "proj"), never_applied)
    for (block, proj), params in groups.items():
        where = f"{block}.attn.processor.{proj}_lora"
        if set(params) != {"down", "up"}:
            raise TLoRAFileError(f"{source}: layer '{where}' has only {sorted(params)}.weight; "
                                 "need both down.weight and up.weight.")
        name = f"{block}.attn.{FLUX_PROJ[proj]}"
        target = b.resolve(name, where)
        if target is not None:
            down, up = pair_factors(params["down"], params["up"], where, source)
            b.add(target, name, down, up, schedule=b.schedule(down.shape[0], min_rank, power))
    return b.finish(sd, "vanilla", "reference-flux")


def lycoris_base_factors(weight: torch.Tensor, rank: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LyCORIS's default T-LoRA init of a layer: ``(Q0 (r, in), P0 (out, r), lambda0 (r,))``.

    The top-``rank`` SVD of the fp32 weight, zero-padded with lambda 1e-6 where ``rank`` exceeds
    the matrix's rank, as ``TLoraModule`` computes it (sig_type "principal", use_data_init).
    """
    # On the weight's own device, as LyCORIS does (a GPU is much faster for the 1280-wide SDXL layers).
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    q0, p0, s0 = vh[:rank].cpu(), u[:, :rank].cpu(), s[:rank].cpu()
    pad = rank - q0.shape[0]
    if pad > 0:
        q0 = torch.nn.functional.pad(q0, (0, 0, 0, pad))
        p0 = torch.nn.functional.pad(p0, (0, pad))
        s0 = torch.nn.functional.pad(s0, (0, pad), value=1e-6)
    return q0, p0, s0


def _named_weight(weight: torch.Tensor, target: Target) -> torch.Tensor:
    """The named layer's own weight inside the module's (its rows of a fused layer)."""
    if target.out_rows is not None:
        weight = weight[target.out_rows[0]:target.out_rows[1]]
    if target.swap_halves:
        weight = torch.cat(weight.chunk(2, dim=0)[::-1], dim=0)
    return weight


def read_lycoris(sd: Mapping[str, torch.Tensor], inventory: Inventory, *,
                 min_rank: float | None = None, power: float | None = None, source: str = "file",
                 base_weights: Mapping[str, torch.Tensor] | None = None,
                 family: Family | None = None) -> TLoRAWeights:
    """Read a LyCORIS ``tlora`` file; ``base_weights`` (module path -> weight) rebuild its base."""
    b = AdapterCollector(inventory, source, family=family)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in sd.items():
        m = LYCORIS_TLORA_KEY.match(key)
        if m is not None:
            groups[m["name"]][m["param"]] = tensor
        elif strip_prefix(key)[1]:
            b.skip("text-encoder layers (only the diffusion model is adapted)", key)
        else:
            b.skip("not LyCORIS 'tlora' parameters (other algorithms are not read here)", key)
    if groups and base_weights is None:
        raise TLoRAFileError(
            f"{source}: LyCORIS T-LoRA files do not store their frozen base factors; they are "
            "recomputed from the model's base weights, which the caller must pass (base_weights).")
    ranks = set()
    for name, params in groups.items():
        where = f"lycoris_{name}"
        missing = {"q_layer.weight", "p_layer.weight", "lambda_layer"} - set(params)
        if missing:
            raise TLoRAFileError(f"{source}: layer '{where}' lacks {sorted(missing)}.")
        if params["q_layer.weight"].ndim != 2:
            b.skip("convolution layers (LyCORIS T-LoRA on convolutions is not supported)", where)
            continue
        target = b.resolve(name, where)
        if target is None:
            continue
        q, p, lam = (as_f32(params[k]) for k in ("q_layer.weight", "p_layer.weight", "lambda_layer"))
        r = q.shape[0]
        if target.module not in base_weights:
            raise TLoRAFileError(f"{source}: no base weight given for module '{target.module}' "
                                 f"(needed to rebuild the frozen factors of '{where}').")
        q0, p0, lam0 = lycoris_base_factors(_named_weight(base_weights[target.module], target), r)
        alpha = float(params["alpha"]) if "alpha" in params else 0.0
        scale = (alpha if alpha else r) / r     # LyCORIS: alpha None or 0 means alpha = rank
        if p.shape[1] != r or lam.numel() != r:
            raise TLoRAFileError(f"{source}: inconsistent shapes in '{where}': q_layer "
                                 f"{tuple(q.shape)}, p_layer {tuple(p.shape)}, lambda_layer "
                                 f"{tuple(lam.shape)}.")
        down = torch.cat([q, q0])
        up = torch.cat([p * (lam.reshape(1, r) * scale), -(p0 * (lam0.reshape(1, r) * scale))], dim=1)
        b.add(target, name, down, up, parts=2, schedule=b.schedule(r, min_rank, power))
        ranks.add(r)
    if ranks:
        b.warnings.append(f"{source}: " + LYCORIS_WARNING.format(rank="/".join(map(str, sorted(ranks)))))
    return b.finish(sd, "tlora", "lycoris")
