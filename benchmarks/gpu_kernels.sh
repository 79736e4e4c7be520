#!/usr/bin/env bash
# Fused cross-entropy on a CUDA machine in one go: the CUDA test grid (every backend and strategy
# against float64), then the GPU part of kernel_bench.py (ours vs naive, Liger-Kernel and Cut
# Cross-Entropy). Needs torch with CUDA and triton; DeepSpeed is not needed.
#
#   bash benchmarks/gpu_kernels.sh [OUTPUT_DIR]
#
# Air-gapped node: fetch the peers' wheels where pip can reach an index, copy the folder over,
# and the script installs them into a private target first:
#   bash benchmarks/fetch_peer_wheels.sh .whl     # liger-kernel, cut-cross-entropy
# Logs (and the environment) go to OUTPUT_DIR (default: benchmarks/gpu_logs).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/gpu_logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/zhiling-peers .whl/*.whl \
    && export PYTHONPATH="/tmp/zhiling-peers${PYTHONPATH:+:$PYTHONPATH}"
fi
{
  nvidia-smi -L
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  python3 -m pip list 2>/dev/null | grep -i -E "^(liger|cut)" || true
} 2>&1 | tee "$out/environment.txt"

python3 -m pytest -q -m gpu tests/engine/kernels -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
tests_rc=$?
python3 benchmarks/kernel_bench.py --gpu-only --repeats 5 2>&1 | tee "$out/kernel_bench_gpu.log"
bench_rc=$?
echo "gpu_kernels tests_rc=$tests_rc bench_rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
