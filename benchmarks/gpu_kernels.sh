#!/usr/bin/env bash
# Fused cross-entropy on a CUDA machine in one go: the CUDA test grid (every backend and strategy
# against float64), then the GPU part of kernel_bench.py (ours vs naive, Liger-Kernel and Cut
# Cross-Entropy). Needs torch with CUDA and triton; DeepSpeed is not needed.
#
#   bash benchmarks/gpu_kernels.sh [OUTPUT_DIR]
#
# Air-gapped node: fetch the peers' wheels where pip can reach an index, copy the folder over,
# and the script installs them into a private target first (benchmarks/gpu_env.sh):
#   bash benchmarks/fetch_peer_wheels.sh .whl     # liger-kernel, cut-cross-entropy
#   bash benchmarks/gpu_payload.sh                # the same, plus DeepSpeed, for gpu_check.sh
# Logs (and the environment) go to OUTPUT_DIR (default: benchmarks/gpu_logs). Time limits per part,
# in seconds (0 = none): GPU_TESTS_TIMEOUT, GPU_BENCH_TIMEOUT. benchmarks/gpu_check.sh runs this
# script, then an end-to-end training run.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/gpu_logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

source benchmarks/gpu_env.sh
install_carried_wheels
print_environment 2>&1 | tee "$out/environment.txt"

timeout -k 10 "${GPU_TESTS_TIMEOUT:-0}" python3 -m pytest -q -m gpu tests/engine/kernels tests/engine/test_segment_attention.py -p no:cacheprovider 2>&1 \
  | tee "$out/gpu_tests.log"
tests_rc=$?
timeout -k 10 "${GPU_BENCH_TIMEOUT:-0}" python3 benchmarks/kernel_bench.py --gpu-only --repeats 5 2>&1 \
  | tee "$out/kernel_bench_gpu.log"
bench_rc=$?
echo "gpu_kernels tests_rc=$tests_rc bench_rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
