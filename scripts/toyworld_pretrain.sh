#!/usr/bin/env bash
# Regenerate the toy base model (examples/toyworld/base_sdxl_toy.safetensors) from its seed, then
# measure how well it follows captions. About an hour on two CPU cores; extra arguments go to the
# trainer (e.g. --out /tmp/base.safetensors to keep the shipped file).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
eval "$(scripts/setup_runtime.sh)"
export COMFYUI_ROOT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m examples.toyworld.pretrain "$@"
