#!/usr/bin/env bash
# Install, then train the CPU demo on 2 ranks (gloo, ZeRO-2) and show before/after answers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec deepspeed --num_gpus 2 launcher/run.py --config configs/sft/demo.yaml "$@"
