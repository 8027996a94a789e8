"""The weights of a base MODEL as tests compare them before and after T-LoRA Train runs."""

from __future__ import annotations

import torch


def weights(model) -> dict[str, tuple[tuple[int, ...], bool, torch.Tensor]]:
    """Each weight of the diffusion model: (where its data lives, is an inference tensor, values).

    Where the data lives, not the Parameter object: ComfyUI itself wraps the same tensors in new
    Parameter objects when it moves a mixed-precision layer (``ops._quantized_apply``) or takes a
    stock LoRA off (``set_attr_param``)."""
    dm = model.model.diffusion_model
    # Parameters and buffers as they are (a mixed-precision layer's state_dict() makes new tensors).
    tensors = {**dict(dm.named_parameters()), **dict(dm.named_buffers())}
    return {k: (storage(v), v.is_inference(), plain(v).detach().clone()) for k, v in tensors.items()}


def storage(tensor: torch.Tensor) -> tuple[int, ...]:
    """Where ``tensor``'s data lives: its storage's address, or for a wrapper subclass (ComfyUI's
    QuantizedTensor) that of its quantized data, its first inner tensor. (Its small scale tensors
    ComfyUI re-makes itself each time it loads or unloads the layer: measured, not ours.)"""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if callable(flatten) and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = flatten()
        return storage(getattr(tensor, names[0]))
    return (tensor.untyped_storage().data_ptr(),)


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A weight's values as a plain tensor: a ComfyUI QuantizedTensor dequantized, a GGUF tensor's
    packed bytes as they are."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return tensor
    if callable(getattr(tensor, "__tensor_flatten__", None)):
        return tensor.dequantize()
    return tensor.as_subclass(torch.Tensor)


def watch_trainings(monkeypatch):
    """``record(model)``: from then on, the weights of ``model`` are captured just before and just
    after every T-LoRA Train run, with every model unloaded (no stock LoRA patched in); returns the
    list of (before, after) captures. (The run is ``training.job.run_job`` of the pack copy whose
    TLoRATrain ComfyUI's registry holds: a test that loads the pack as a custom node registers a
    second copy of its modules.)"""
    import sys

    import nodes

    job = sys.modules[nodes.NODE_CLASS_MAPPINGS["TLoRATrain"].__module__].job
    captures, watched = [], []
    real = job.run_job

    def run_job(*args, **kwargs):
        import comfy.model_management

        # A stock LoRA is patched into the shared weights while its clone is loaded, and ComfyUI puts
        # the weights back when it unloads it: unload before and after, so what is compared is what
        # the run does.
        comfy.model_management.unload_all_models()
        before = [weights(m) for m in watched]
        out = real(*args, **kwargs)
        comfy.model_management.unload_all_models()
        captures.extend(zip(before, [weights(m) for m in watched]))
        return out

    monkeypatch.setattr(job, "run_job", run_job)

    def record(model):
        watched.append(model)
        return captures

    return record
