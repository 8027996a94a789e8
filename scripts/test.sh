#!/usr/bin/env bash
# Set up the runtime if needed, then lint and run every test inside the real ComfyUI runtime.
# Extra arguments go to pytest (e.g. scripts/test.sh -k loader).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
eval "$(scripts/setup_runtime.sh)"
export COMFYUI_ROOT
# The tiny models run faster on one thread: torch's thread pool costs more than it saves on
# tensors this small (and thrashes when the cores are shared).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "[test] ruff" >&2
"$PYTHON" -m ruff check .
echo "[test] pytest" >&2
status=0
"$PYTHON" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
