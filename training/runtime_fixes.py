"""ComfyUI ops a family's training swaps for the run (``Recipe.runtime_fixes``), and back.

Most comfy_kitchen kernels without an autograd formula are bypassed by ComfyUI itself when
``comfy.model_management.in_training`` is set (:data:`training.prepare.TRAINING_FLAGS`). A few are
called unconditionally; a family whose model calls one names a fix here, and for the duration of a
T-LoRA run the op is replaced by comfy_kitchen's own pure-torch implementation of it (the same
signature and computation, differentiable), then put back on every exit (done, Cancel, error). On a
CPU ComfyUI's call already runs that pure-torch code, so training and sampling agree exactly there;
on a GPU the fused kernel samples and the torch ops train, which agree up to rounding (the torch
version rounds the normalised q / k to the compute dtype before the rotation): not yet measured. The ops
are found by attribute, never by ComfyUI version; where one cannot be swapped the run is refused
before training starts, saying what to do.

- ``eager_rms_rope_split_half``: Anima's self-attention (Cosmos-Predict2 ``predict2.py``) calls
  ``comfy.quant_ops.ck.rms_rope_split_half`` (fused RMS norm + rotary embedding of q and k),
  whose kernel has no backward; ``comfy_kitchen.backends.eager.rope.rms_rope_split_half`` is the
  same computation in torch ops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..tlora_core.families import Family

Swap = tuple[object, str, Callable]
"""``(owner, attribute, replacement)``: during training ``owner.attribute`` is ``replacement``."""


def _eager_rms_rope_split_half(family: Family) -> Swap:
    import comfy.quant_ops

    kitchen = getattr(comfy.quant_ops, "ck", None)
    try:
        from comfy_kitchen.backends.eager.rope import rms_rope_split_half as eager
    except ImportError:
        eager = None
    if kitchen is None or not callable(getattr(kitchen, "rms_rope_split_half", None)) or eager is None:
        raise RuntimeError(
            f"T-LoRA Train: {family.label}'s attention calls comfy_kitchen's rms_rope_split_half, "
            "whose kernel has no backward; training swaps in comfy_kitchen's pure-torch version "
            "(comfy_kitchen.backends.eager.rope.rms_rope_split_half), which this installation "
            "lacks. Update comfy_kitchen to the version ComfyUI's requirements.txt names.")
    return kitchen, "rms_rope_split_half", eager


FIXES: dict[str, Callable[[Family], Swap]] = {
    "eager_rms_rope_split_half": _eager_rms_rope_split_half,
}


def resolve(family: Family) -> list[Swap]:
    """The swaps ``family``'s recipe names, checked against this ComfyUI; RuntimeError naming what
    is missing otherwise (the Train node calls it before any work)."""
    swaps = []
    for name in family.recipe.runtime_fixes:
        fix = FIXES.get(name)
        if fix is None:
            raise RuntimeError(f"T-LoRA Train: {family.label}'s recipe names the runtime fix {name!r}, "
                               f"which the pack does not have (known: {', '.join(FIXES)})")
        swaps.append(fix(family))
    return swaps


@contextmanager
def runtime_fixes(family: Family) -> Iterator[None]:
    """Install ``family``'s swaps for the block; the original ops are back on any exit."""
    swaps = resolve(family)
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in swaps]
    try:
        for owner, attr, replacement in swaps:
            setattr(owner, attr, replacement)
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)
