"""What a model family file declares: :class:`Family` and its parts (pure data, no ComfyUI).

A family is recognised from a ComfyUI model by the exact NAME of its ``model_base`` class (and,
where two families share one class, of its ``supported_models`` config class), so a subclass such
as ``Flux2(Flux)`` is never taken for its parent. Everything else the pack needs to know about the
family is a field here; the rest of the pack asks the registry (:mod:`tlora_core.families`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..adapter import VARIANTS
from ..inventory import Inventory, Target

SCOPES = ("attention", "attention+ff")
"""Target scopes: the paper's attention layers, or attention plus the feed-forward layers."""
TIMESTEP_RULES = ("discrete", "flow")
"""discrete: the model's own 1000-step table (``ModelSamplingDiscrete.timestep(sigma)``);
flow: ``t = 1000 * sigma`` with the sigma the model samples at (after its shift)."""

Rows = Callable[[int, int], list]
"""``rows(out_features, in_features)`` -> the output row ranges (or None = all) of one module's
adapters, one adapter per entry."""


def whole(out_features: int, in_features: int) -> list:
    """One adapter on the whole layer."""
    return [None]


def thirds(out_features: int, in_features: int) -> list:
    """A fused q|k|v Linear: one adapter per projection, on equal thirds of the output rows."""
    h = out_features // 3
    return [(i * h, (i + 1) * h) for i in range(3)]


def leading_qkv(out_features: int, in_features: int) -> list:
    """A fused q|k|v|mlp Linear (FLUX single blocks): one adapter on each of q, k, v (as wide as
    the input), none on the MLP rows."""
    return [(i * in_features, (i + 1) * in_features) for i in range(3)]


def no_foreign_names(inventory: Inventory) -> Mapping[str, Target]:
    """``Family.foreign_names`` of a family whose LoRA files use ComfyUI's module paths (kohya's
    ``lora_unet_`` spelling of them is read by flattening): nothing to map."""
    return {}


def after_qkv(out_features: int, in_features: int) -> list:
    """The MLP rows after q|k|v of such a fused Linear."""
    return [(3 * in_features, out_features)]


@dataclass(frozen=True)
class Layers:
    """Target rule: every Linear whose path matches ``pattern`` (``re.search``), in ``scope``
    (``"attention"``, or ``"ff"`` = only with ``"attention+ff"``), split into adapters by ``rows``;
    with ``when``, only the paths for which ``when(path, inventory)`` holds (a layer whose role
    depends on its neighbours, such as SD3's last text block, which has no output projection)."""

    pattern: str
    scope: str = "attention"
    rows: Rows = whole
    when: Callable[[str, Inventory], bool] | None = None


@dataclass(frozen=True)
class TrainTarget:
    """One adapter: on ``module`` (a Linear), writing ``out_rows`` of its output (None = all)."""

    module: str
    out_rows: tuple[int, int] | None
    out_features: int
    in_features: int

    @property
    def rows(self) -> int:
        return self.out_features if self.out_rows is None else self.out_rows[1] - self.out_rows[0]


@dataclass(frozen=True)
class Recipe:
    """The family's training defaults, with the reasons shown in the Train node's tooltips."""

    variant: str                 # tlora_core.adapter.VARIANTS
    rank: int
    why: str                     # one sentence per default, for the tooltips
    needs_checkpointing: bool = False   # blocks update tensors in place: backward needs it
    training_guidance: float | None = None  # distilled-guidance models train at this value
    # ComfyUI ops swapped for the run (ids of ``training.runtime_fixes.FIXES``): a model whose
    # forward calls a kernel without backward (Anima's fused RMS-norm + RoPE) trains through a
    # differentiable implementation of the same op, put back on every exit.
    runtime_fixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReferenceFiles:
    """How the T-LoRA reference code spells this family's files (read by
    :mod:`tlora_core.files.foreign_tlora`, which knows no family).

    A key the reference code writes matches ``key``: group ``layer`` (the attention), ``proj``
    (its projection) and ``param``; a layer's params are one of the sets in ``kinds`` (``"ortho"``:
    the reference Ortho layer ``p / q / lambda`` with its frozen ``base_*``; ``"vanilla"``: ``down``
    / ``up``). ``layer_name(layer, proj)`` is the layer's diffusers name, which the family's
    ``foreign_names`` resolve; ``skip(layer, proj)`` gives a reason to ignore a layer, or None.
    """

    format: str                                   # the file format's name (source_format)
    key: re.Pattern[str]
    layer_name: Callable[[str, str], str]
    kinds: Mapping[str, frozenset[str]]
    recipe: str                                   # the reference script's schedule, for messages
    skip: Callable[[str, str], str | None] | None = None
    vanilla_note: str = ""                        # said when a file reads as vanilla T-LoRA


@dataclass(frozen=True)
class Family:
    """Everything the pack knows about one model family; see the module docstring."""

    id: str                                   # file metadata ``tlora.architecture``
    label: str                                # what messages call it
    description: str                          # "an SDXL UNet": what its diffusion model is
    model_classes: tuple[str, ...]            # comfy.model_base class names (exact)
    recognise_inventory: Callable[[Inventory], bool]  # from module names alone (files, tests)
    timestep: str                             # TIMESTEP_RULES
    latent_channels: int
    pooled_output: bool                       # its conditioning carries a pooled text vector
    layers: tuple[Layers, ...]
    recipe: Recipe
    file_labels: Mapping[str, str]            # modelspec.architecture, ss_base_model_version
    foreign_names: Callable[[Inventory], Mapping[str, Target]]  # diffusers names -> targets
    conditioning_widths: Callable[[Mapping[str, Any]], tuple[int | None, int | None]]
    checkpoint_blocks: tuple[str, ...]        # block class names to checkpoint in training
    real_config: Mapping[str, Any]            # unet config of the real model (inventory tests)
    config_classes: tuple[str, ...] = ()      # comfy.supported_models names; () = any
    latent_ndim: int = 4                      # 4: (B, C, H, W); 5: (B, C, T, H, W)
    latent_downscale: int = 8                 # image pixels per latent pixel (its VAE's)
    # The first ComfyUI release with the family's model class (Krea 2, Anima: "0.33.0"); None =
    # every release the pack supports. Older ComfyUI cannot load such a model at all.
    min_comfyui: str | None = None
    position: int = 100                       # order in lists and messages (then by id)
    # Other released models of the family (FLUX.2 Klein beside dev): name -> unet config, checked
    # like real_config; the README's table shows real_config's.
    other_real_configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    reference_files: ReferenceFiles | None = None  # the T-LoRA reference code's files, if it has any
    # A regex (``re.search``) on a LoRA file's key that only this family's files contain, whatever
    # tool wrote it (dots or underscores): what an error calls the file when it does not fit the
    # model ("looks made for ..."). None: the generic rules of tlora_core.files.describe decide.
    file_key_hint: str | None = None
    # Its diffusers names spell joint attention blocks as FLUX's and SD3's do
    # (``transformer_blocks.N.attn.*``): such keys count for it when its other keys say so.
    diffusers_joint_blocks: bool = False

    def __post_init__(self) -> None:
        if self.timestep not in TIMESTEP_RULES:
            raise ValueError(f"family {self.id}: timestep rule {self.timestep!r} not in {TIMESTEP_RULES}")
        for rule in self.layers:
            if rule.scope not in ("attention", "ff"):
                raise ValueError(f"family {self.id}: layer scope {rule.scope!r} is not attention/ff")
        if self.recipe.variant not in VARIANTS:
            raise ValueError(f"family {self.id}: recipe variant {self.recipe.variant!r} not in {VARIANTS}")

    def targets(self, inventory: Inventory, scope: str = "attention") -> list[TrainTarget]:
        """The adapters to train, in module order (per module in rule order).

        Raises ValueError for an unknown scope or when nothing matches.
        """
        if scope not in SCOPES:
            raise ValueError(f"unknown target scope {scope!r} (known: {', '.join(SCOPES)})")
        rules = [r for r in self.layers if r.scope == "attention" or scope == "attention+ff"]
        compiled = [(re.compile(r.pattern), r.rows, r.when) for r in rules]
        out = []
        for name, (out_f, in_f) in inventory.items():
            for pattern, rows, when in compiled:
                if pattern.search(name) and (when is None or when(name, inventory)):
                    out.extend(TrainTarget(name, r, out_f, in_f) for r in rows(out_f, in_f))
        if not out:
            raise ValueError(f"no {scope} layers found in this {self.label} model; is it really "
                             f"{self.label}? (first Linear layers: {list(inventory)[:3]})")
        return out
