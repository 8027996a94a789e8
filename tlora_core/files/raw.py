"""Reading a file's tensors and metadata safely, whatever its format.

Only two ways in: safetensors (never executes anything), and for ``.pt`` / ``.pth`` / ``.bin``
``torch.load(..., weights_only=True)`` accepting nothing but a flat dict of tensors. Every failure
becomes a :class:`~tlora_core.files.check.TLoRAFileError` naming the file.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .check import TLoRAFileError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")     # torch's zip container, a raw pickle stream
_REFUSED_GLOBAL = re.compile(r"\bglobal\b", re.IGNORECASE)


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The safe unpickler names the class or function it refused to import ("GLOBAL x.y was
        # not an allowed global"); anything else it stops at is data it cannot parse at all.
        if _REFUSED_GLOBAL.search(str(err)):
            raise TLoRAFileError(
                f"{path.name}: refused: the pickle holds objects other than tensors, and loading it "
                "could run code. Convert it to .safetensors with a tool you trust.") from err
        raise TLoRAFileError(
            f"{path.name}: cannot be read as a PyTorch file: it is corrupt, truncated, or not "
            "written by torch.save. Download it again, or convert it to .safetensors.") from err
    except Exception as err:  # torch raises many different types for damaged archives
        raise TLoRAFileError(f"{path.name}: cannot be read as a PyTorch file, it is corrupt or "
                             f"truncated ({type(err).__name__}: {err}). Download it again.") from err
    if not isinstance(data, dict):
        raise TLoRAFileError(f"{path.name}: holds a {type(data).__name__}, not a dict of tensors.")
    for key, value in data.items():
        what = f"entry {key!r} is a {type(value).__name__}, not a tensor" if isinstance(key, str) \
            else f"entry {key!r} is named by a {type(key).__name__}, not a string"
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TLoRAFileError(
                f"{path.name}: {what}. Only flat dicts of tensors are read; extract the LoRA "
                "weights into a .safetensors file.")
    return data


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
    except Exception as err:  # SafetensorError, OSError, ValueError: all mean "unreadable"
        with open(path, "rb") as handle:
            head = handle.read(4)
        if head.startswith(_PICKLE_MAGIC):
            raise TLoRAFileError(
                f"{path.name}: not a safetensors file (it looks like a PyTorch pickle). Only "
                f".safetensors, or {'/'.join(PICKLE_SUFFIXES)} files holding tensors only, are "
                "read.") from err
        raise TLoRAFileError(
            f"{path.name}: not a valid safetensors file: it is corrupt, truncated or of another "
            f"kind ({err}). Download or save it again.") from err


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file, or of a tensors-only ``.pt/.pth/.bin``
    (metadata ``{}``). Raises TLoRAFileError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise TLoRAFileError(f"{path.name}: no such file ({path.parent}).")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path), {}
    return _read_safetensors(path)
