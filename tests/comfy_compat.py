"""Everything in the test harness that differs between the ComfyUI versions the pack supports.

One place, detected by feature (an attribute, a parameter, a dataclass field), never by version
number, so a newer ComfyUI that keeps a surface keeps working. What differs, as read in the
0.3.75 and 0.33.0 sources:

- progress updates are throttled in 0.33 (``comfy.utils.PROGRESS_THROTTLE_MIN_*``): tests that
  watch every step through ``PROGRESS_BAR_HOOK`` switch the throttle off;
- the executor's output cache has a sync ``get`` in 0.3.75 and an async ``get`` beside a sync
  ``get_local`` in 0.33;
- ``PromptExecutor`` reads ``cache_args["ram_inactive"]`` in 0.33 (0.3.75 ignores extra keys);
- FLUX's parameter dataclass gained required fields (``txt_ids_dims``); the values are the ones
  ComfyUI's own model detection gives FLUX.1 (``comfy/model_detection.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# The executor's cache settings for tests: nothing kept between prompts.
EXECUTOR_CACHE_ARGS = {"lru": 0, "ram": 0, "ram_inactive": 0}

# Required FLUX.1 parameters newer ComfyUI added, with the value its model detection gives FLUX.1.
FLUX1_DETECTED_DEFAULTS: dict[str, Any] = {"txt_ids_dims": []}


def configure() -> None:
    """Runtime settings the tests rely on: every progress update reaches PROGRESS_BAR_HOOK."""
    import comfy.utils

    for name in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):
        if hasattr(comfy.utils, name):
            setattr(comfy.utils, name, 0)


def flux_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` plus the required FLUX.1 fields this runtime's FluxParams has and it lacks."""
    from comfy.ldm.flux.model import FluxParams

    out = dict(config)
    for f in dataclasses.fields(FluxParams):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in out and f.name in FLUX1_DETECTED_DEFAULTS:
            out[f.name] = FLUX1_DETECTED_DEFAULTS[f.name]
    return out


def params_config(params_class, config: dict[str, Any], detected: dict[str, Any]) -> dict[str, Any]:
    """``config`` fitted to this runtime's parameter dataclass ``params_class``: keys the class does
    not have are dropped (``image_model`` is kept: model classes consume it), required fields that
    ``config`` lacks come from ``detected`` (what ComfyUI's model detection gives them)."""
    names = {f.name for f in dataclasses.fields(params_class)}
    out = {k: v for k, v in config.items() if k in names or k == "image_model"}
    for f in dataclasses.fields(params_class):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in out and f.name in detected:
            out[f.name] = detected[f.name]
    return out


def chroma_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` fitted to this runtime's ChromaParams (0.33 added ``txt_ids_dims`` and
    ``vec_in_dim``, which 0.3.75 does not accept)."""
    from comfy.ldm.chroma.model import ChromaParams

    return params_config(ChromaParams, config, {"txt_ids_dims": [], "vec_in_dim": None})


def flux2_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` fitted to this runtime's FluxParams for FLUX.2: 0.33 requires ``txt_ids_dims``
    (its model detection gives FLUX.2 ``[3]``), 0.3.75 does not accept it."""
    from comfy.ldm.flux.model import FluxParams

    return params_config(FluxParams, config, {"txt_ids_dims": [3]})


def cached_output(executor, node_id: str):
    """The executor's cache entry for ``node_id`` (``.outputs`` per slot, ``.ui``), or None."""
    cache = executor.caches.outputs
    getter = getattr(cache, "get_local", None) or cache.get
    return getter(str(node_id))
