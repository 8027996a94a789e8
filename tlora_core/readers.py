"""Readers for the T-LoRA / LoRA files people already have, mapped onto ComfyUI's module names.

Every reader returns a :class:`~tlora_core.weights.TLoRAWeights` of
:class:`~tlora_core.adapter.LowRankAdapter` s, whose forward reproduces the source tool's:

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
- Plain LoRA (kohya ``lora_unet_*``, ComfyUI ``diffusion_model.*``, diffusers / peft ``unet.*`` /
  ``transformer.*``, LyCORIS LoCon): ``y = W x + alpha/r * up(down(x))`` (scale folded into up).
  alpha is the layer's ``.alpha`` tensor; diffusers / PEFT files store none and take it from their
  PEFT LoraConfig (:mod:`tlora_core.peft_config`, passed in as ``lora_config``); without either
  the scale is 1 (for PEFT-style files, with a warning that it is assumed).
  With ``refactor=True`` each layer is re-factored (:mod:`tlora_core.refactor`) into components
  sorted by singular value and given the rank schedule, so any LoRA gets a timestep schedule.

These files carry no schedule: ``min_rank`` / ``power`` come from the caller (default: the paper's
``rank // 2``, recorded as a warning, and power 1). Keys a reader cannot use (text encoders,
convolutions, other algorithms) are counted and reported in ``weights.warnings``; layers that match
no module of the model are reported too, and a file of which nothing matches raises.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch

from .adapter import LowRankAdapter, RankSchedule
from .keys import ModuleIndex, Target, split_lora_key, strip_prefix
from .peft_config import LoraConfigScale, is_peft_style
from .refactor import refactor_lowrank
from .schedule import resolve_min_rank
from .validate import (
    ARCHITECTURE_LABELS,
    Inventory,
    TLoRAFileError,
    guess_file_architecture,
)
from .weights import TLoRAWeights

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


class _Builder:
    """Collects the adapters of one file and everything that was skipped or unmatched."""

    def __init__(self, inventory: Inventory, source: str, hint: str = "") -> None:
        self.index = ModuleIndex(inventory)
        self.source = source
        self.hint = hint
        self.adapters: dict[str, list[LowRankAdapter]] = {}
        self.skipped: dict[str, list[str]] = defaultdict(list)
        self.unmatched: list[str] = []
        self.warnings: list[str] = []
        self._rank_index: dict[tuple[int, int], torch.Tensor] = {}
        self._schedules: dict[int, RankSchedule] = {}

    def skip(self, reason: str, key: str) -> None:
        self.skipped[reason].append(key)

    def resolve(self, name: str, key: str) -> Target | None:
        target = self.index.resolve(name)
        if target is None:
            self.unmatched.append(key)
        return target

    def schedule(self, rank: int, min_rank: float | None, power: float | None) -> RankSchedule:
        """One shared schedule per rank, so adapters of equal layout share one mask per call."""
        if rank not in self._schedules:
            if min_rank is None:
                resolved = max(1, rank // 2)
                self.warnings.append(
                    f"{self.source}: the file stores no rank schedule; using min_rank = {resolved} "
                    f"for rank {rank} (the paper's rank / 2). Set min_rank to change it.{self.hint}")
            else:
                if min_rank > rank:
                    self.warnings.append(f"{self.source}: min_rank {min_rank} exceeds the rank "
                                         f"{rank} of some layers; capped at {rank} for them.")
                resolved = resolve_min_rank(rank, min(min_rank, rank))
            self._schedules[rank] = RankSchedule(rank, resolved, 1.0 if power is None else power)
        return self._schedules[rank]

    def check(self, target: Target, name: str, down: torch.Tensor, up: torch.Tensor) -> None:
        """Raise unless ``up @ down`` (named layer's space) fits ``target``'s module."""
        out, in_features = self.index.shape(target)
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != in_features or up.shape[0] != out:
            raise TLoRAFileError(
                f"{self.source}: shape mismatch on layer '{name}' (model module "
                f"'{target.module}'): the model expects (out={out}, in={in_features}), the file "
                f"has down {tuple(down.shape)} and up {tuple(up.shape)}. The file was made for a "
                "model of another size; use the file made for this one.")

    def add(self, target: Target, name: str, down: torch.Tensor, up: torch.Tensor, *,
            parts: int = 1, schedule: RankSchedule | None = None) -> None:
        """Add ``up @ down`` (in the named layer's space) on ``target`` after checking its shape."""
        self.check(target, name, down, up)
        if target.swap_halves:
            up = torch.cat(up.chunk(2, dim=0)[::-1], dim=0)
        k = down.shape[0]
        if (k, parts) not in self._rank_index:
            self._rank_index[(k, parts)] = torch.arange(k // parts).repeat(parts)
        adapter = LowRankAdapter(down.contiguous(), up.contiguous(), self._rank_index[(k, parts)],
                                 schedule, parts, target.out_rows)
        self.adapters.setdefault(target.module, []).append(adapter)

    def finish(self, keys: Iterable[str], variant: str, source_format: str,
               masked: bool = True) -> TLoRAWeights:
        """The weights, or a no-match error naming the architecture the file looks made for."""
        arch = self.index.architecture
        schedule = self._schedules[max(self._schedules)] if masked and self._schedules else None
        if not self.adapters:
            names = self.unmatched or list(keys)
            sample = ", ".join(f"'{n}'" for n in names[:4]) or "(no keys)"
            raise TLoRAFileError(
                f"{self.source}: none of its layers matches a layer of this model. The file looks "
                f"made for {ARCHITECTURE_LABELS.get(guess_file_architecture(names), 'an unknown model')}"
                f"; the model is {ARCHITECTURE_LABELS[arch]}. First keys: {sample}.")
        warnings = list(self.warnings)
        for reason, skipped in self.skipped.items():
            warnings.append(f"{self.source}: {len(skipped)} key(s) ignored: {reason} "
                            f"(e.g. {', '.join(skipped[:3])}).")
        if self.unmatched:
            warnings.append(
                f"{self.source}: {len(self.unmatched)} layer key(s) match no module of this "
                f"{ARCHITECTURE_LABELS[arch]} model and are ignored (e.g. "
                f"{', '.join(self.unmatched[:3])}); {len(self.adapters)} modules are adapted.")
        return TLoRAWeights(self.adapters, arch, variant, schedule, source_format, {}, warnings)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32)


def _ortho_factors(params: Mapping[str, torch.Tensor], where: str, source: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of the reference Ortho layer ``p(q x * lambda m) - base_p(base_q x * base_lambda m)``."""
    q, p, lam = (_f32(params[k]) for k in ("q_layer.weight", "p_layer.weight", "lambda_layer"))
    q0, p0, lam0 = (_f32(params[k]) for k in ("base_q.weight", "base_p.weight", "base_lambda"))
    r = q.shape[0]
    if not (q.ndim == p.ndim == 2 and p.shape[1] == r and lam.numel() == r
            and q0.shape == q.shape and p0.shape == p.shape and lam0.numel() == r):
        raise TLoRAFileError(
            f"{source}: inconsistent shapes in '{where}': q_layer {tuple(q.shape)}, p_layer "
            f"{tuple(p.shape)}, lambda_layer {tuple(lam.shape)}, base_q {tuple(q0.shape)}, "
            f"base_p {tuple(p0.shape)}, base_lambda {tuple(lam0.shape)} (need q (r, in), "
            "p (out, r), lambda (1, r), the base_* alike).")
    return torch.cat([q, q0]), torch.cat([p * lam.reshape(1, r), -(p0 * lam0.reshape(1, r))], dim=1)


def _vanilla_factors(down: torch.Tensor, up: torch.Tensor, where: str, source: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    down, up = _f32(down), _f32(up)
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise TLoRAFileError(f"{source}: inconsistent shapes in '{where}': down {tuple(down.shape)}, "
                             f"up {tuple(up.shape)} (need down (r, in), up (out, r)).")
    return down, up


def read_reference_sdxl(sd: Mapping[str, torch.Tensor], inventory: Inventory, *,
                        min_rank: float | None = None, power: float | None = None,
                        source: str = "file") -> TLoRAWeights:
    """Read the T-LoRA reference code's SDXL file (Ortho or vanilla; see the module docstring)."""
    b = _Builder(inventory, source, REFERENCE_HINT)
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in sd.items():
        m = REF_SDXL_KEY.match(key)
        if m is None:
            b.skip("not a T-LoRA reference-code SDXL key", key)
        else:
            groups[(m["proc"], m["proj"])][m["param"]] = tensor
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
        down, up = (_ortho_factors(params, where, source) if kind == "ortho" else
                    _vanilla_factors(params["down.weight"], params["up.weight"], where, source))
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
                        source: str = "file") -> TLoRAWeights:
    """Read the T-LoRA reference code's FLUX ``lora.pt`` keys (vanilla T-LoRA on fused rows)."""
    b = _Builder(inventory, source, REFERENCE_HINT)
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in sd.items():
        m = REF_FLUX_KEY.match(key)
        if m is None:
            b.skip("not a T-LoRA reference-code FLUX key", key)
        elif m["block"].startswith("single_") and m["proj"] not in ("to_q", "to_k", "to_v"):
            b.skip("single-block adapters the reference code creates but never applies "
                   "(its single blocks have no output or context projection)", key)
        else:
            groups[(m["block"], m["proj"])][m["param"]] = tensor
    for (block, proj), params in groups.items():
        where = f"{block}.attn.processor.{proj}_lora"
        if set(params) != {"down", "up"}:
            raise TLoRAFileError(f"{source}: layer '{where}' has only {sorted(params)}.weight; "
                                 "need both down.weight and up.weight.")
        name = f"{block}.attn.{FLUX_PROJ[proj]}"
        target = b.resolve(name, where)
        if target is not None:
            down, up = _vanilla_factors(params["down"], params["up"], where, source)
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
                 base_weights: Mapping[str, torch.Tensor] | None = None) -> TLoRAWeights:
    """Read a LyCORIS ``tlora`` file; ``base_weights`` (module path -> weight) rebuild its base."""
    b = _Builder(inventory, source)
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
        q, p, lam = (_f32(params[k]) for k in ("q_layer.weight", "p_layer.weight", "lambda_layer"))
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


def _plain_groups(b: _Builder, sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in sd.items():
        split = split_lora_key(key)
        if split is None:
            b.skip("not LoRA up/down/alpha tensors (e.g. LoHa, LoKr, T-LoRA parameters)", key)
            continue
        name, part = split
        if strip_prefix(name)[1]:
            b.skip("text-encoder layers (only the diffusion model is adapted)", key)
        elif part == "dora":
            raise TLoRAFileError(f"{b.source}: '{key}' is a DoRA magnitude; DoRA files cannot be "
                                 "applied as an additive low-rank term. Use a plain LoRA.")
        else:
            groups[name][part] = tensor
    return groups


def _plain_scale(parts: Mapping[str, torch.Tensor], name: str, rank: int,
                 lora_config: LoraConfigScale | None, source: str) -> float | None:
    """alpha / r of one layer: its ``.alpha`` tensor (kohya, ComfyUI, LyCORIS), else the PEFT
    config's; None when neither states it (the caller applies scale 1)."""
    if "alpha" in parts:
        return float(parts["alpha"]) / rank
    return None if lora_config is None else lora_config.scale(name, rank, source)


def read_plain_lora(sd: Mapping[str, torch.Tensor], inventory: Inventory, *,
                    min_rank: float | None = None, power: float | None = None,
                    refactor: bool = False, source: str = "file",
                    lora_config: LoraConfigScale | None = None) -> TLoRAWeights:
    """Read a plain LoRA (kohya / ComfyUI / diffusers / LyCORIS LoCon keys).

    ``refactor=False``: unmasked adapters ``alpha/r * up @ down``. ``refactor=True``: each layer's
    delta re-factored into components sorted by singular value, masked with a schedule of that
    layer's rank (``min_rank`` capped at it). ``lora_config``: the PEFT LoraConfig a diffusers /
    PEFT file was saved with, for layers without an ``.alpha`` tensor.
    """
    b = _Builder(inventory, source)
    if lora_config is not None and lora_config.use_dora:
        raise TLoRAFileError(f"{source}: {lora_config.where} says use_dora: DoRA files cannot be "
                             "applied as an additive low-rank term. Use a plain LoRA.")
    unscaled = 0
    for name, parts in _plain_groups(b, sd).items():
        if "mid" in parts or parts.get("down", torch.empty(0, 0)).ndim != 2:
            b.skip("convolution layers (only Linear layers are adapted)", name)
            continue
        if not {"down", "up"} <= set(parts):
            raise TLoRAFileError(f"{source}: layer '{name}' has {sorted(parts)} but needs both "
                                 "up and down weights.")
        layer = strip_prefix(name)[0]
        target = b.resolve(layer, name)
        if target is None:
            continue
        down, up = _vanilla_factors(parts["down"], parts["up"], name, source)
        scale = _plain_scale(parts, layer, down.shape[0], lora_config, source)
        unscaled += scale is None
        up = up * (1.0 if scale is None else scale)
        if not refactor:
            b.add(target, name, down, up)
            continue
        b.check(target, name, down, up)
        down, up, _ = refactor_lowrank(down, up)
        b.add(target, name, down, up, schedule=b.schedule(down.shape[0], min_rank, power))
    if unscaled and is_peft_style(sd):
        b.warnings.append(
            f"{source}: a diffusers / PEFT LoRA that does not state its lora_alpha (no "
            "'lora_adapter_metadata' with one, no adapter_config.json beside it, no .alpha "
            f"tensors): scale 1 (lora_alpha = r) is assumed for {unscaled} layer(s), as diffusers "
            "does. If it was trained with another lora_alpha, its effect is off by lora_alpha / r; "
            "adjust strength_model.")
    if refactor:
        b.warnings.append(f"{source}: plain LoRA re-factored into orthogonal components sorted by "
                          "singular value; the rank schedule masks the weakest first.")
    return b.finish(sd, "vanilla" if refactor else "lora", "lora", masked=refactor)


def detect_format(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
    """"tlora" | "reference-sdxl" | "reference-flux" | "lycoris" | "lora" | "unknown"."""
    if metadata and "tlora.format_version" in metadata:
        return "tlora"
    keys = list(keys)
    if any(REF_SDXL_KEY.match(k) for k in keys):
        return "reference-sdxl"
    if any(REF_FLUX_KEY.match(k) for k in keys):
        return "reference-flux"
    if any(k.startswith("lycoris_") and k.endswith(".lambda_layer") for k in keys):
        return "lycoris"
    if any((s := split_lora_key(k)) is not None and s[1] in ("down", "up") for k in keys):
        return "lora"
    return "unknown"
