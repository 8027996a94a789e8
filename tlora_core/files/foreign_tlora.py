"""Readers for the T-LoRA files other tools write: the reference code's, and LyCORIS's.

- T-LoRA reference code: how it spells a family's files is declared by the family
  (``Family.reference_files``, :class:`~tlora_core.families.ReferenceFiles`; SDXL's
  ``pytorch_lora_weights.safetensors``, FLUX's ``lora.pt``). Keys
  ``<attention processor>.<proj>_lora.<param>``, a layer's params one of two kinds. Ortho (paper Eq. 8)::

      y = W x + p(q(x) * lambda * m) - base_p(base_q(x) * base_lambda * m)

  -> ``parts = 2``, ``down = [q; base_q]``, ``up = [p * lambda | -base_p * base_lambda]``.
  Vanilla (Eq. 5): ``y = W x + up(down(x) * m)``. No scale anywhere (the processors get scale 1).
  Each layer is read onto its diffusers name, which the model's family resolves (on fused
  layers: rows of FLUX's ``qkv`` / ``linear1``); layers the family's spelling skips (FLUX's
  single-block adapters the reference forward never calls) are reported.
- LyCORIS ``tlora``: ``lycoris_<diffusers name with _>.{q_layer.weight,p_layer.weight,lambda_layer,
  alpha}``, ``y = W x + alpha/r * (P diag(lambda m) Q - P0 diag(lambda0 m) Q0) x``. P0, Q0, lambda0
  are not stored; LyCORIS recomputes them on load as the top-r SVD of the current base weight
  (its default ``sig_type="principal"`` init), and so does :func:`read_lycoris`, from the weights
  as the base computes with them (dequantized: ``tlora_core.base_weight``). On a rounded base
  (fp8, int8, nvfp4, mxfp8, GGUF Q-types) that rebuild is off, and a second warning says by how
  much it is expected to be and how to convert the file exactly (:mod:`tlora_core.rounded_base`).

These files carry no schedule: ``min_rank`` / ``power`` come from the caller (default
:func:`tlora_core.schedule.default_min_rank`, recorded as a warning, and power 1).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch

from .. import families
from ..families import Family, ReferenceFiles
from ..inventory import Inventory, Target
from ..rounded_base import LayerCase, layer_sensitivity, measured_names, rounded_base_warning, summarize
from ..weights import TLoRAWeights
from .check import TLoRAFileError
from .collect import AdapterCollector, as_f32, pair_factors
from .names import strip_prefix

LYCORIS_TLORA_KEY = re.compile(r"^lycoris_(?P<name>.+?)\.(?P<param>q_layer\.weight|p_layer\.weight|"
                               r"lambda_layer|alpha)$")
LYCORIS_WARNING = (
    "LyCORIS T-LoRA files do not store the frozen base factors (P0, lambda0, Q0) that the adapter "
    "subtracts; they were recomputed here, as LyCORIS itself does on load, as the top-{rank} SVD "
    "of this model's base weights. That is exact only for LyCORIS's default init "
    "(sig_type='principal', use_data_init=True) and only if these base weights are bit-identical "
    "to those the training started from (the same file, in the same precision, then and now); a "
    "file trained with another init ('last', 'middle', or a random matrix) gives a wrong result.")


def reference_spellings() -> dict[str, tuple[Family, ReferenceFiles]]:
    """The reference code's file formats (``"reference-sdxl"``, ...) -> (family, spelling), in
    registry order: the families that declare one."""
    return {f.reference_files.format: (f, f.reference_files)
            for f in families.all_families() if f.reference_files is not None}


def detect_reference(keys: Iterable[str]) -> str | None:
    """The reference format whose spelling some of ``keys`` match, or None."""
    keys = list(keys)
    for fmt, (_, spelling) in reference_spellings().items():
        if any(spelling.key.match(k) for k in keys):
            return fmt
    return None


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


def _reference_groups(b: AdapterCollector, sd: Mapping[str, torch.Tensor], spelling: ReferenceFiles,
                      label: str) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """The file's tensors grouped by (layer, proj) and parameter; keys that do not match the
    spelling, or that it skips, are recorded as skipped."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in sd.items():
        m = spelling.key.match(key)
        if m is None:
            reason = f"not a T-LoRA reference-code {label} key"
        else:
            reason = spelling.skip(m["layer"], m["proj"]) if spelling.skip else None
        if reason:
            b.skip(reason, key)
        else:
            groups[(m["layer"], m["proj"])][m["param"]] = tensor
    return groups


def _kind_of(params: Mapping[str, torch.Tensor], spelling: ReferenceFiles, where: str,
             source: str) -> str:
    for kind, names in spelling.kinds.items():
        if set(params) == names:
            return kind
    known = " or ".join(f"{sorted(names)} ({'Ortho' if kind == 'ortho' else kind})"
                        for kind, names in spelling.kinds.items())
    raise TLoRAFileError(f"{source}: layer '{where}' has {sorted(params)}; a reference T-LoRA "
                         f"layer has {known}.")


def read_reference(sd: Mapping[str, torch.Tensor], inventory: Inventory, fmt: str, *,
                   min_rank: float | None = None, power: float | None = None,
                   source: str = "file", family: Family | None = None) -> TLoRAWeights:
    """Read a file of the reference code's format ``fmt`` (see :func:`reference_spellings`) onto
    the model; ``family`` is the model's (default: the one its inventory shows)."""
    file_family, spelling = reference_spellings()[fmt]
    hint = (f" The reference code's {file_family.label} recipe uses {spelling.recipe}; its "
            "hparams.yml records the value a file was trained with.")
    b = AdapterCollector(inventory, source, hint, family)
    kinds = set()
    for (layer, proj), params in _reference_groups(b, sd, spelling, file_family.label).items():
        where = f"{layer}.processor.{proj}_lora"
        kind = _kind_of(params, spelling, where, source)
        kinds.add(kind)
        name = spelling.layer_name(layer, proj)
        target = b.resolve(name, where)
        if target is None:
            continue
        if kind == "ortho":
            down, up = _reference_ortho_pair(params, where, source)
        else:
            down, up = pair_factors(params["down.weight"], params["up.weight"], where, source)
        parts = 2 if kind == "ortho" else 1
        b.add(target, name, down, up, parts=parts, schedule=b.schedule(down.shape[0] // parts,
                                                                     min_rank, power))
    if len(kinds) > 1:
        raise TLoRAFileError(f"{source}: mixes Ortho (q_layer/p_layer/lambda_layer) and vanilla "
                             "(down/up) layers; a reference T-LoRA file holds one kind.")
    if kinds == {"vanilla"} and spelling.vanilla_note:
        b.warnings.append(f"{source}: read as a vanilla T-LoRA of the reference code (rank-masked). "
                          + spelling.vanilla_note)
    return b.finish(sd, "tlora" if kinds == {"ortho"} else "vanilla", fmt)


def read_reference_sdxl(sd: Mapping[str, torch.Tensor], inventory: Inventory, **kwargs) -> TLoRAWeights:
    """:func:`read_reference` of the reference code's SDXL file (``pytorch_lora_weights.safetensors``)."""
    return read_reference(sd, inventory, "reference-sdxl", **kwargs)


def read_reference_flux(sd: Mapping[str, torch.Tensor], inventory: Inventory, **kwargs) -> TLoRAWeights:
    """:func:`read_reference` of the reference code's FLUX file (``lora.pt``)."""
    return read_reference(sd, inventory, "reference-flux", **kwargs)


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
    storage = getattr(base_weights, "storage", None)   # tlora_core.base_weight.BaseWeights
    measured = {name: i for i, name in enumerate(measured_names(list(groups)))}
    rounded, ratios = [], []
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
        weight = _named_weight(base_weights[target.module], target)
        q0, p0, lam0 = lycoris_base_factors(weight, r)
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
        kind = storage(target.module) if storage is not None else None
        if kind is not None and kind.rounded:
            rounded.append(kind.label)
            step = kind.step(base_weights[target.module]) if name in measured else None
            if step is not None:
                ratios.append(layer_sensitivity(LayerCase(
                    name, weight, _named_weight(step, target), (p * (lam.reshape(1, r) * scale)) @ q,
                    (p0 * (lam0.reshape(1, r) * scale)) @ q0, r, scale), seed=measured[name]))
    if ranks:
        rank = "/".join(map(str, sorted(ranks)))
        b.warnings.append(f"{source}: " + LYCORIS_WARNING.format(rank=rank))
        if rounded:
            b.warnings.append(rounded_base_warning(source, rounded, rank, summarize(ratios, len(rounded))))
    return b.finish(sd, "tlora", "lycoris")
