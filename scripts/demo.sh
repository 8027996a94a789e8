#!/usr/bin/env bash
# Set up the runtime if needed, then run the no-GPU demo (results in demo_output/ unless --output).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
eval "$(scripts/setup_runtime.sh)"
export COMFYUI_ROOT
# The tiny models run faster on one thread: torch's thread pool costs more than it saves on
# tensors this small (and thrashes when the cores are shared).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" scripts/demo.py "$@"
