#!/usr/bin/env bash
# Set up the runtime if needed, then run the demo: the toy-world experiment (LoRA vs T-LoRA on one
# image, real ComfyUI on the CPU; results in demo_output/toyworld/). `--plumbing` runs the older
# quick demo on random tiny SDXL/FLUX models instead (results in demo_output/). Other arguments go
# to the demo (see `python -m bench.toyworld.run --help`).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
eval "$(scripts/setup_runtime.sh)"
export COMFYUI_ROOT
# The tiny models run faster on one thread: torch's thread pool costs more than it saves on
# tensors this small (and thrashes when the cores are shared).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
case "${1:-}" in
  --plumbing) shift; exec "$PYTHON" scripts/demo.py "$@" ;;
  # scripts/toyworld_pretrain.sh: regenerate the toy base model.
  --pretrain-base) shift; exec "$PYTHON" -m bench.toyworld.pretrain "$@" ;;
esac
exec "$PYTHON" -m bench.toyworld.run "$@"
