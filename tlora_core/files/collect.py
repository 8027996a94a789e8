"""Collecting the adapters a foreign file's reader finds, and what it had to skip.

:class:`AdapterCollector` resolves layer names on the model (:class:`~.names.ModuleIndex`), checks
shapes, shares one rank schedule per rank and one ``rank_index`` per column layout (so adapters of
equal layout share one mask per model call), and turns what it collected into
:class:`~tlora_core.weights.TLoRAWeights` with warnings for everything skipped or unmatched.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

from ..adapter import LowRankAdapter, RankSchedule
from ..families import Family
from ..inventory import Inventory, Target
from ..schedule import default_min_rank, resolve_min_rank
from ..weights import TLoRAWeights
from .check import TLoRAFileError
from .describe import ARCHITECTURE_LABELS, no_match_message
from .names import ModuleIndex


class AdapterCollector:
    """Collects the adapters of one file and everything that was skipped or unmatched."""

    def __init__(self, inventory: Inventory, source: str, hint: str = "",
                 family: Family | None = None) -> None:
        self.index = ModuleIndex(inventory, family)
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
                resolved = default_min_rank(rank)
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
            raise TLoRAFileError(no_match_message(self.source, list(keys), arch,
                                                  shown=self.unmatched or list(keys)))
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


def as_f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32)


def pair_factors(down: torch.Tensor, up: torch.Tensor, where: str, source: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    down, up = as_f32(down), as_f32(up)
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise TLoRAFileError(f"{source}: inconsistent shapes in '{where}': down {tuple(down.shape)}, "
                             f"up {tuple(up.shape)} (need down (r, in), up (out, r)).")
    return down, up
