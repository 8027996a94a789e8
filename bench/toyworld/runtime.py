"""The real ComfyUI runtime for the toy world (the tests' bootstrap: ComfyUI on the CPU, the pack
imported as ``comfyui_tlora``)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def bootstrap():
    """Import ComfyUI (CPU) and the pack; returns the harness module."""
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    import comfy_runtime

    comfy_runtime.bootstrap()
    return comfy_runtime
