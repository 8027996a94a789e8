"""The registry of model families: one declarative file per family, found automatically.

Every module of this package that defines ``FAMILY`` (a :class:`Family`) is a family; adding one
is adding such a file (and its tiny test config). The rest of the pack asks this registry:

- :func:`recognise` a ComfyUI model: by the exact name of its ``model_base`` class (and config
  class where a family names some), never by ``isinstance``, so ``Flux2`` and ``Chroma``
  (subclasses of ``Flux``) are not taken for FLUX.1; an unknown model gets an error naming its
  class and the families the pack knows.
- :func:`from_inventory`: the family that module names alone show (files, pure-torch callers).
- :func:`get` by id (the ``tlora.architecture`` written in files), :func:`all_families`.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..inventory import Inventory
from ._spec import SCOPES, TIMESTEP_RULES, Family, Layers, Recipe, ReferenceFiles, TrainTarget

__all__ = ["SCOPES", "TIMESTEP_RULES", "Family", "Layers", "Recipe", "ReferenceFiles", "TrainTarget",
           "UnknownFamily", "all_families", "from_inventory", "get", "ids", "known_labels", "recognise"]


class UnknownFamily(ValueError):
    """A model or id the pack has no family file for."""


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(family, Family):
            if family.id in found:
                raise RuntimeError(f"two family files declare the id {family.id!r}")
            formats = {f.reference_files.format for f in found.values() if f.reference_files}
            if family.reference_files and family.reference_files.format in formats:
                raise RuntimeError(f"two family files declare the reference file format "
                                   f"{family.reference_files.format!r}")
            found[family.id] = family
    return dict(sorted(found.items(), key=lambda item: (item[1].position, item[0])))


_FAMILIES = _discover()


def all_families() -> list[Family]:
    return list(_FAMILIES.values())


def ids() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def known_labels(conjunction: str = "and") -> str:
    """``"SDXL and FLUX"``: the families the pack knows, for messages and tooltips."""
    labels = [f.label for f in _FAMILIES.values()]
    return labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} {conjunction} {labels[-1]}"


def get(family_id: str) -> Family:
    """The family with this id; UnknownFamily naming the known ones otherwise."""
    family = _FAMILIES.get(family_id)
    if family is None:
        raise UnknownFamily(f"unknown model family {family_id!r}: the pack knows {known_labels()} "
                            f"(ids: {', '.join(_FAMILIES)})")
    return family


def recognise(model) -> Family:
    """The family of a ComfyUI ``BaseModel`` (duck-typed: its class and ``model_config``'s).

    Matches the exact class name, so a subclass of a known class (``Flux2(Flux)``) is not
    recognised as its parent. Raises UnknownFamily naming the model's class and the known families.
    """
    name = type(model).__name__
    model_config = getattr(model, "model_config", None)
    config = "none" if model_config is None else type(model_config).__name__
    for family in _FAMILIES.values():
        if name in family.model_classes and (not family.config_classes or config in family.config_classes):
            return family
    # A known class the model derives from (Flux for Flux2), not a base shared by many families
    # (BaseModel, which SD 1.5 names together with its config class).
    parents = [c.__name__ for c in type(model).__mro__[1:]
               if any(c.__name__ in f.model_classes and not f.config_classes for f in _FAMILIES.values())]
    related = f" It is derived from {parents[0]}, but is a model family of its own." if parents else ""
    raise UnknownFamily(
        f"T-LoRA does not know this model: its class is {name} (config {config}). The pack knows "
        f"{known_labels()}.{related} Load a model of a supported family.")


def from_inventory(inventory: Inventory) -> Family:
    """The family whose module names the inventory shows; UnknownFamily if none does."""
    for family in _FAMILIES.values():
        if family.recognise_inventory(inventory):
            return family
    described = [f.description for f in _FAMILIES.values()]
    what = f"neither {' nor '.join(described)}" if len(described) > 1 else f"not {described[0]}"
    raise UnknownFamily(f"the model is {what} (modules such as {sorted(inventory)[:3]})")
