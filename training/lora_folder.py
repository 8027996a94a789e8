"""Where the trainer writes: ComfyUI's ``loras`` folder (first configured path), via folder_paths.

A run writes ``<name>.safetensors`` (the T-LoRA) and ``<name>.tlora-state`` (resume state); every
``save_every`` steps ``<name>_step00100.safetensors`` and its state. An existing final file is never
overwritten unless the run resumes from it: a new name gets a counter (``<name>_00001``).
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from .state import state_path

SUFFIX = ".safetensors"


def loras_dir() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0])


def clean_name(file_name: str) -> str:
    """``file_name`` without the suffix; ValueError for names that leave the loras folder."""
    name = file_name.strip().replace("\\", "/")
    if name.lower().endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    parts = [p for p in name.split("/") if p]
    if not parts or name.startswith("/") or any(p in (".", "..") for p in parts) or ":" in name:
        raise ValueError(f"file_name {file_name!r} must be a relative name inside the loras folder, "
                         "e.g. 'tlora/my_dog'")
    return "/".join(parts)


def output_path(file_name: str, resume_from: Path | None = None) -> Path:
    """The final file of this run (see module docstring for the naming rules)."""
    base = loras_dir() / clean_name(file_name)
    path = base.with_name(base.name + SUFFIX)
    if resume_from is not None and path.resolve() == Path(resume_from).resolve():
        return path
    counter = 0
    while path.exists() or state_path(path).exists():
        counter += 1
        path = base.with_name(f"{base.name}_{counter:05d}{SUFFIX}")
    return path


def intermediate_path(final: Path, step: int) -> Path:
    return final.with_name(f"{final.name[: -len(SUFFIX)]}_step{step:05d}{SUFFIX}")


def display_name(path: Path) -> str:
    """The name ComfyUI's LoRA lists show for ``path`` (relative to its loras folder, ``/``)."""
    for root in folder_paths.get_folder_paths("loras"):
        try:
            return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return Path(path).name


def resumable_files() -> list[str]:
    """LoRA names (as ComfyUI lists them) that have a training state next to them."""
    out = []
    for name in folder_paths.get_filename_list("loras"):
        full = folder_paths.get_full_path("loras", name)
        if full and name.endswith(SUFFIX) and os.path.isfile(state_path(full)):
            out.append(name)
    return out


def resolve_resume(name: str) -> Path:
    full = folder_paths.get_full_path("loras", name)
    if full is None:
        raise ValueError(f"resume_from: no LoRA named {name!r} in the loras folder")
    return Path(full)
