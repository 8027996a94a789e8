#!/usr/bin/env bash
# Set up the runtime if needed, then lint and run every test inside the real ComfyUI runtime.
#
#   scripts/test.sh [--comfyui 0.3.75|0.33] [pytest arguments...]
#
# --comfyui picks the runtime (default 0.3.75, see scripts/setup_runtime.sh); the rest goes to
# pytest (e.g. scripts/test.sh --comfyui 0.33 -k loader).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
runtime_args=()
if [ "${1:-}" = "--comfyui" ]; then
  runtime_args=(--comfyui "${2:?--comfyui needs a version}")
  shift 2
elif [[ "${1:-}" == --comfyui=* ]]; then
  runtime_args=("$1")
  shift
fi
eval "$(scripts/setup_runtime.sh "${runtime_args[@]}")"
export COMFYUI_ROOT COMFYUI_VERSION
# The tiny models run faster on one thread: torch's thread pool costs more than it saves on
# tensors this small (and thrashes when the cores are shared).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "[test] ruff" >&2
"$PYTHON" -m ruff check .
echo "[test] pytest on ComfyUI ${COMFYUI_VERSION:-at $COMFYUI_ROOT}" >&2
status=0
"$PYTHON" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
