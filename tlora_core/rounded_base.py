"""What a rounded base does to a LyCORIS T-LoRA file, and the figure the pack can honestly give.

A LyCORIS ``tlora`` file stores the trained factors ``P, lambda, Q`` of each layer but not the
frozen ones it subtracts; those are rebuilt on load as the top-r SVD of the current base weight
(:func:`tlora_core.files.foreign_tlora.lycoris_base_factors`). With ``s = alpha / r`` and
``F(W) = P0 diag(lambda0) Q0`` the rebuilt term of a base ``W``, the full-rank change is::

    D(W) = s * (P diag(lambda) Q - F(W))

The file means ``D(W0)`` on the weights ``W0`` it was trained on. On a rounded copy ``Wq`` (fp8,
int8, nvfp4, mxfp8, GGUF Q-types) it gives ``D(Wq) = D(W0) + E`` with the error
``E = s * (F(W0) - F(Wq))``: even an untrained file (``D(W0) = 0``) then changes the model.

``E`` cannot be measured at load time: ``W0`` is not in the model. What is measured instead, by
:func:`rounding_sensitivity`, is how far the rebuilt term moves when every weight of *this* base
moves at random within its own rounding step (:meth:`tlora_core.base_weight.Storage.step`, uniform
in +-step/2, the distribution of a round-to-nearest error; :func:`layer_sensitivity`):
``s * ||F(Wq + N) - F(Wq)||_F``,
relative to this file's change on this base ``||D(Wq)||_F``, per layer. Rounding ``W0`` to ``Wq``
is one such move, so the figure is the size ``E`` is expected to have, not ``E`` itself; the
warning says so. Only the trained factors and ``Wq`` enter it, so it costs one SVD per measured
layer (at most :data:`MEASURED_LAYERS`, spread over the file's layers: :func:`measured_names`),
measured as each layer is read, so no more than one layer's matrices are held at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MEASURED_LAYERS = 16

CONVERT_HINT = (
    "To apply this file exactly on any base, convert it once against the full-precision model file "
    "(the bf16/fp16/fp32 .safetensors the quantized one was made from): python "
    "<this pack's folder>/scripts/convert_lycoris_tlora.py --base <that model file> <this file>. The "
    "converted T-LoRA stores the frozen factors, so no base weight enters it.")


@dataclass(frozen=True)
class LayerCase:
    """One adapted layer of a LyCORIS file on a rounded base.

    ``weight``: the named layer's dequantized base weight ``Wq``; ``step``: its modelled rounding step
    (same shape) or None where the storage has no model; ``trained``: ``s * P diag(lambda) Q``;
    ``rebuilt``: ``s * F(Wq)``; ``rank``: r; ``scale``: s.
    """

    name: str
    weight: torch.Tensor
    step: torch.Tensor | None
    trained: torch.Tensor
    rebuilt: torch.Tensor
    rank: int
    scale: float


@dataclass(frozen=True)
class Sensitivity:
    """Per measured layer ``s ||F(Wq + N) - F(Wq)|| / ||D(Wq)||``: its median and largest value,
    over ``measured`` of the file's ``layers`` rounded layers."""

    median: float
    largest: float
    measured: int
    layers: int


def top_r_term(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """``P0 diag(lambda0) Q0``: the best rank-``rank`` approximation of ``weight`` (float32 SVD)."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def measured_names(names: list[str], max_layers: int = MEASURED_LAYERS) -> list[str]:
    """The layers :func:`layer_sensitivity` measures: up to ``max_layers`` of ``names`` in name order,
    evenly spread (first and last included)."""
    ordered = sorted(set(names))
    if len(ordered) <= max_layers:
        return ordered
    return sorted({ordered[round(i * (len(ordered) - 1) / (max_layers - 1))] for i in range(max_layers)})


def layer_sensitivity(case: LayerCase, seed: int) -> float:
    """``s ||F(Wq + N) - F(Wq)|| / ||D(Wq)||`` of one layer (module docstring), ``N`` uniform in
    +-step/2 drawn from ``seed``. Raises ValueError for a case without a rounding model."""
    if case.step is None:
        raise ValueError(f"layer {case.name}: its storage has no rounding model")
    gen = torch.Generator().manual_seed(seed)
    noise = (torch.rand(case.weight.shape, generator=gen) - 0.5) * case.step
    moved = case.scale * top_r_term(case.weight + noise, case.rank)
    change = torch.linalg.norm(case.trained - case.rebuilt)
    return float(torch.linalg.norm(moved - case.rebuilt) / change.clamp(min=1e-30))


def summarize(ratios: list[float], layers: int) -> Sensitivity | None:
    """The median and largest of the measured ``ratios`` of a file's ``layers`` rounded layers;
    None when none was measured (no storage with a rounding model)."""
    if not ratios:
        return None
    ordered = sorted(ratios)
    return Sensitivity(ordered[len(ordered) // 2], ordered[-1], len(ordered), layers)


def rounded_base_warning(source: str, storages: list[str], rank: str,
                         sensitivity: Sensitivity | None) -> str:
    """The Loader's warning for a LyCORIS file on a base whose weights are rounded (``storages``:
    the labels of the rounded storages its layers use)."""
    kinds = " and ".join(sorted(set(storages)))
    if sensitivity is None:
        figure = ("The pack has no model of this storage's rounding, so it cannot say how large the "
                  "error is; with 8 bits or fewer per weight it can be as large as the file's own "
                  "change.")
    else:
        figure = (
            "That error cannot be measured here (the original weights are not in this model). As "
            "its expected size, the pack measured how far the rebuilt factors move when each base "
            "weight moves at random within its rounding step: "
            f"{100 * sensitivity.median:.2g}% of this file's change on this base (median over "
            f"{sensitivity.measured} of {sensitivity.layers} layers, largest "
            f"{100 * sensitivity.largest:.2g}%).")
    return (f"{source}: LyCORIS T-LoRA on a rounded base ({kinds}). The file does not store the frozen "
            f"factors (P0, lambda0, Q0) it subtracts; they are rebuilt here as the top-{rank} SVD of "
            "this model's weights, which are rounded copies of the weights the file was trained on, "
            "so the result differs from the same file on a full-precision base (even an untrained "
            f"file changes the image). {figure} {CONVERT_HINT}")
