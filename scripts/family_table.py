#!/usr/bin/env python
"""Print the README's table of model families, generated from the real-size inventories.

Run on a runtime:  .runtime/0.3.75/venv/bin/python scripts/family_table.py
Each family's real config (``Family.real_config``) is built from ComfyUI's own classes on the meta
device; its target layers, adapter count and adapter parameters at the family's default rank are
counted from that model, its timestep rule and shift from its own model sampling. One row per
family the running ComfyUI has (run it on both runtimes: Krea 2 and Anima rows come from 0.33);
``tests/test_families.py`` checks the README holds these rows.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# fp32 adapter weights, their gradients and AdamW's two moments: 16 bytes per trained parameter.
TRAINING_BYTES_PER_PARAM = 16


def _layers(targets) -> str:
    """The distinct target layers inside a block (``img_attn.qkv`` (q, k, v rows)), in model order."""
    per_module: dict[str, int] = {}
    for t in targets:
        per_module[t.module] = per_module.get(t.module, 0) + 1
    seen: dict[str, int] = {}
    for module, count in per_module.items():
        # The name inside its block: after the last "<stack>.<index>." (blocks, layers, refiners).
        seen.setdefault(re.split(r"[A-Za-z_]+\.\d+\.(?:\d+\.)?", module)[-1], count)
    return ", ".join(f"`{name}`" + (f" ({count} row groups)" if count > 1 else "")
                     for name, count in seen.items())


def _timestep(family, model) -> str:
    ms = model.model_sampling
    kind = type(ms).__mro__[1].__name__   # ComfyUI combines the sampling class with its prediction
    if family.timestep == "discrete":
        return f"discrete: {kind}'s 1000-step table"
    return f"flow: 1000 x sigma after the shift ({kind}, shift {float(ms.shift):g})"


def row(family_id: str) -> str:
    from comfyui_tlora.tlora_core import families
    from comfyui_tlora.tlora_core.inventory import inventory_from_module
    from comfyui_tlora.tlora_core.schedule import default_min_rank

    import comfy_runtime
    import family_configs

    family = families.get(family_id)
    model = comfy_runtime.build_model(family_id, family.real_config, device="meta")
    targets = family.targets(inventory_from_module(model.diffusion_model))
    recipe = family.recipe
    min_rank = default_min_rank(recipe.rank)
    params = sum(recipe.rank * (t.in_features + t.rows) for t in targets)
    classes = " / ".join(f"`model_base.{c}`" for c in family.model_classes)
    if family.config_classes:
        classes += " + " + " / ".join(f"`supported_models.{c}`" for c in family.config_classes)
    memory = params * TRAINING_BYTES_PER_PARAM / 2**20
    return (f"| {family.label} (`{family.id}`) | {classes} | {_layers(targets)} | {_timestep(family, model)} "
            f"| {recipe.variant}, rank {recipe.rank}, min_rank {min_rank} | {len(targets)} adapters, "
            f"{params / 1e6:.1f} M params, {memory:.0f} MiB to train | "
            f"{_runtimes(family, family_configs.TINY[family_id].runtimes)} |")


def _runtimes(family, versions) -> str:
    tested = ", ".join(versions)
    if family.min_comfyui is None:
        return tested
    since = ".".join(family.min_comfyui.split(".")[:2])
    classes = " / ".join(f"`{c}`" for c in family.model_classes)
    return f"{tested} ({since} only: older ComfyUI has no {classes})"


HEADER = ("| Family | ComfyUI class | Target layers (attention) | Timestep for the rank schedule | Defaults "
          "| At the default rank (real size) | Tested on ComfyUI |\n| --- | --- | --- | --- | --- | --- | --- |")


def rows() -> list[str]:
    """The rows of the families this ComfyUI has (the others' tiny configs leave it out)."""
    import comfy_runtime
    import family_configs

    comfy_runtime.bootstrap()
    version = comfy_runtime.comfyui_version()
    return [row(f) for f in comfy_runtime.families.ids() if family_configs.runs_here(f, version)]


def main() -> None:
    sys.stdout.write("\n".join([HEADER, *rows()]) + "\n")


if __name__ == "__main__":
    main()
