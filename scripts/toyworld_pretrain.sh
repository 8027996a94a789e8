#!/usr/bin/env bash
# Regenerate the toy base model (bench/toyworld/base_sdxl_toy.safetensors) from its seed: about
# an hour on two CPU cores. Extra arguments go to the trainer (e.g. --out /tmp/base.safetensors to
# keep the shipped file; --steps, --seed).
exec "$(dirname "${BASH_SOURCE[0]}")/demo.sh" --pretrain-base "$@"
