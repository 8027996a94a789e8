"""T-LoRA and LyCORIS files for the quantized fixtures' models (``quantized_models.QuantizedBase``).

- :func:`write_tlora`: a trained-looking T-LoRA in the pack's own format (Ortho factors with
  ``A != A0``, rank 4, min_rank 2) on the family's attention targets (fused layers one adapter per
  projection), scaled to a clear but sane change of the tiny model's output.
- :func:`lycoris_layers` / :func:`write_lycoris`: a LyCORIS ``tlora`` file as LyCORIS trains it on
  the full-precision weights (``base.full``): its default init is the top-r SVD of each named
  layer's weight, moved by ``drift`` (0: an untrained file). Layers are named in the family's
  diffusers spelling where it has one (rows of fused layers), else by the model's own paths.
- :func:`write_full_precision`: the full-precision model file a quantized copy is made from.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace

import quantized_files
import reference_files as rf
import torch
from file_format_helpers import make_adapter

import comfy_runtime
import family_configs

RANK, MIN_RANK = 4, 2


def _core(name: str):
    return importlib.import_module(f"{comfy_runtime.PACK_NAME}.tlora_core.{name}")


def inventory(base) -> dict[str, tuple[int, int]]:
    return _core("inventory").inventory_from_module(base.full.model.diffusion_model)


def write_tlora(base, folder: Path, name: str, seed: int = 7, scale: float = 1.0) -> str:
    """Write a trained T-LoRA for ``base``'s family into ``folder``; returns the file name."""
    core = SimpleNamespace(adapter=_core("adapter"))   # what make_adapter reads
    inv = inventory(base)
    gen = torch.Generator().manual_seed(seed)
    adapters: dict[str, list] = {}
    for target in comfy_runtime.family_spec(base.family).targets(inv):
        out, inp = inv[target.module]
        rows = target.out_rows
        adapter = make_adapter(core, "tlora", out if rows is None else rows[1] - rows[0], inp, RANK,
                               MIN_RANK, gen=gen, out_rows=rows)
        adapter.up.mul_(scale / inp ** 0.5)
        adapters.setdefault(target.module, []).append(adapter)
    weights = _core("weights").TLoRAWeights(adapters, family_configs.registry_id(base.family), "tlora",
                                            _core("adapter").RankSchedule(RANK, MIN_RANK), "tlora")
    _core("files.write").save_tlora(folder / name, weights, inventory=inv)
    return name


def lycoris_layers(base, drift: float, seed: int = 3, rank: int = RANK, alpha: float = 2.0
                   ) -> dict[str, rf.Lycoris]:
    """``{layer name: LyCORIS factors}`` trained (``drift`` > 0) from ``base.full``'s weights."""
    dm = base.full.model.diffusion_model
    inv = inventory(base)
    spec = comfy_runtime.family_spec(base.family)
    wanted = {(t.module, t.out_rows) for t in spec.targets(inv)}
    names = {n: t for n, t in spec.foreign_names(inv).items()
             if (t.module, t.out_rows) in wanted and not t.swap_halves}
    named = {(t.module, t.out_rows) for t in names.values()}
    for module, rows in sorted(wanted - named, key=str):
        if rows is None:
            names[module] = _core("inventory").Target(module)
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, target in sorted(names.items()):
        weight = dm.get_submodule(target.module).weight.detach().float()
        if target.out_rows is not None:
            weight = weight[target.out_rows[0]:target.out_rows[1]]
        layers[name] = rf.trained_lycoris(weight, rank, alpha, gen, drift=drift)
    return layers


def write_lycoris(base, folder: Path, name: str, drift: float = 0.05, seed: int = 3) -> str:
    """Write a LyCORIS ``tlora`` file for ``base`` into ``folder``; returns the file name."""
    rf.write_safetensors(folder / name, rf.lycoris_state_dict(lycoris_layers(base, drift, seed)))
    return name


def write_full_precision(base, path: Path) -> Path:
    """``base.full`` as the float32 diffusion-model file it was quantized from."""
    quantized_files.write_float({k: v.detach() for k, v in base.full.model.diffusion_model.state_dict().items()},
                                path)
    return path


def adapters_equal(a, b) -> bool:
    """Whether two TLoRAWeights hold the same adapters bit for bit (modules, rows, schedules)."""
    if set(a.adapters) != set(b.adapters):
        return False
    return all(len(a.adapters[m]) == len(b.adapters[m]) and all(
        torch.equal(x.up, y.up) and torch.equal(x.down, y.down) and x.out_rows == y.out_rows
        and x.schedule == y.schedule and x.parts == y.parts
        for x, y in zip(a.adapters[m], b.adapters[m])) for m in a.adapters)
