#!/usr/bin/env bash
# Download the wheels of the kernels kernel_bench.py compares against (pure Python packages; their
# torch/triton needs are left to the GPU machine's own install) into a folder, for a GPU node that
# cannot reach a package index. benchmarks/gpu_kernels.sh installs them from .whl/.
#
#   bash benchmarks/fetch_peer_wheels.sh [FOLDER]      # default .whl
set -euo pipefail
folder="${1:-.whl}"
mkdir -p "$folder"
python3 -m pip download --no-deps --only-binary=:all: -d "$folder" liger-kernel cut-cross-entropy
ls -l "$folder"
