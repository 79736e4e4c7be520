#!/usr/bin/env bash
# Everything a GPU machine must prove, in one command, in under 8 minutes on one H200:
#   (a) the CUDA kernel test grid (every loss backend and strategy against float64),
#   (b) kernel_bench.py's GPU part: ours vs naive, Liger-Kernel and Cut Cross-Entropy,
#       ((a) and (b) are benchmarks/gpu_kernels.sh)
#   (c) end to end: ~50 bf16 optimizer steps of a Qwen2.5-0.5B-shaped model (random weights,
#       vocab 151,936; benchmarks/gpu_check_e2e.py) on the carried tokenizer and alpaca data, chatml,
#       packed 4096-token rows, ZeRO-2 on one rank, launched as users launch it
#       (`deepspeed --num_gpus 1 launcher/run.py --config ...`); tokens/s and MFU from the run's
#       metrics.jsonl, warm-up steps excluded, against the goal MFU >= 45%.
#
#   bash benchmarks/gpu_payload.sh                            # first, where pip reaches an index
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]                 # on the GPU machine; no network needed
#   GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh [OUTPUT_DIR] # reduced, on a machine without a GPU
#
# The project runs from the source tree (PYTHONPATH = the repo root), never pip-installed. The
# wheels in .whl/ (DeepSpeed and what it needs, the peer kernels) are installed with --no-index into
# a private target put first on PYTHONPATH (benchmarks/gpu_env.sh); the tokenizer and data come from
# .gpu_payload/ (else ../shared/data). Both folders are made by gpu_payload.sh and are ignored by git.
#
# CPU mode (GPU_CHECK_CPU=1, also chosen when no CUDA device is visible): the wheels installed for
# python 3.12 into a private target (the proof that they install offline; under another python the
# local packages stay in use), the CPU kernel tests, kernel_bench.py --quick, and the same
# end-to-end path with a tiny model of the same family (2 layers, hidden 128, vocab 151,936, fp32,
# 256-token rows, 5 steps, 1 rank); MFU means nothing there and is reported as such.
#
# Each part runs under `timeout` (seconds, overridable): GPU_CHECK_TESTS_TIMEOUT (120),
# GPU_CHECK_BENCH_TIMEOUT (120), GPU_CHECK_E2E_TIMEOUT (what is left of GPU_CHECK_BUDGET, 450 in
# all: at least 170). GPU_CHECK_OPTIMIZER=fused trains with DeepSpeed's fused Adam as a plain GPU run
# does (its first use compiles it for 1-2 minutes; the default, torch's AdamW, skips that: on
# ZeRO-2's flat partition it costs milliseconds a step). GPU_CHECK_OVERRIDES="key=value ..." adds run
# config overrides to the e2e launch (e.g. data.padding_free=false). Logs go to OUTPUT_DIR (default
# benchmarks/gpu_logs; 8 files at most): environment.txt, gpu_tests.log / cpu_tests.log,
# kernel_bench_gpu.log / kernel_bench_cpu.log, e2e.log, e2e_config.yaml, e2e_metrics.jsonl,
# summary.txt. The run itself writes to runs/gpu_check/ (ignored; replaced on every call). The last
# line sums up every part's exit status and the headline figures; the exit status is 0 when all
# parts passed (the MFU goal is reported, not enforced).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/gpu_logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$SECONDS

source benchmarks/gpu_env.sh
install_carried_wheels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

mode=gpu
if [[ "${GPU_CHECK_CPU:-0}" != 0 ]] \
   || ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  mode=cpu
fi
tests_timeout="${GPU_CHECK_TESTS_TIMEOUT:-120}"
bench_timeout="${GPU_CHECK_BENCH_TIMEOUT:-120}"
budget="${GPU_CHECK_BUDGET:-450}"
rm -f "$out"/{environment.txt,{gpu,cpu}_tests.log,kernel_bench_{gpu,cpu}.log,e2e.log,e2e_config.yaml,e2e_metrics.jsonl} \
  "$out/summary.txt"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "gpu_check: mode=$mode, logs in $out"

# --- (a) + (b): the kernels ------------------------------------------------------------------
if [[ $mode == gpu ]]; then
  GPU_TESTS_TIMEOUT="$tests_timeout" GPU_BENCH_TIMEOUT="$bench_timeout" \
    bash benchmarks/gpu_kernels.sh "$out" 2>&1 | tee "$scratch/gpu_kernels.out"
  last=$(grep '^gpu_kernels tests_rc=' "$scratch/gpu_kernels.out" | tail -n 1)
  tests_rc=$(sed -n 's/.*tests_rc=\([0-9]*\).*/\1/p' <<<"$last"); tests_rc=${tests_rc:-1}
  bench_rc=$(sed -n 's/.*bench_rc=\([0-9]*\).*/\1/p' <<<"$last"); bench_rc=${bench_rc:-1}
  tests_log="$out/gpu_tests.log" bench_log="$out/kernel_bench_gpu.log"
else
  print_environment 2>&1 | tee "$out/environment.txt"
  tests_log="$out/cpu_tests.log" bench_log="$out/kernel_bench_cpu.log"
  timeout -k 10 "$tests_timeout" python3 -m pytest -q tests/engine/kernels -p no:cacheprovider 2>&1 | tee "$tests_log"
  tests_rc=$?
  timeout -k 10 "$bench_timeout" python3 benchmarks/kernel_bench.py --quick 2>&1 | tee "$bench_log"
  bench_rc=$?
fi
tests_line=$(grep -E '^[0-9]+ (passed|failed|skipped|error)|^=+ .*(passed|failed|error).* =+$' "$tests_log" 2>/dev/null \
  | tail -n 1 | tr -d '=' | xargs)
checks_failed=$(grep -c '^gpu check .* FAIL' "$bench_log" 2>/dev/null); checks_failed=${checks_failed:-0}
if [[ $mode == gpu ]]; then
  # Headline: Qwen2.5-0.5B's lm_head shape (d=896), 16k rows, half of them prompt.
  bench_line=$(grep '^kernel_bench gpu bf16 N=16384 d=896 V=151936 prompt=50% ours_triton' "$bench_log" | tail -n 1 \
    | sed 's/^kernel_bench gpu //')
else
  bench_line=$(grep '^kernel_bench cpu' "$bench_log" | tail -n 1 | sed 's/^kernel_bench //')
fi
(( checks_failed == 0 || bench_rc != 0 )) || bench_rc=1

# --- (c): end to end -------------------------------------------------------------------------
e2e_log="$out/e2e.log"
run_root=runs/gpu_check
if [[ $mode == gpu ]]; then shape=qwen2.5-0.5b; else shape=tiny; fi
data_dir=.gpu_payload
if [[ ! -f $data_dir/alpaca_zh_demo.json && -f ../shared/data/alpaca_zh_demo.json ]]; then
  data_dir=../shared/data
  echo "note: no .gpu_payload/ (bash benchmarks/gpu_payload.sh makes it); using $data_dir" | tee "$e2e_log"
fi
tokenizer="$data_dir/tokenizer-zh-6400" data="$data_dir/alpaca_zh_demo.json"
model_dir="$run_root/model-$shape" run_dir="$run_root/e2e" config="$out/e2e_config.yaml"
e2e() {  # runs under timeout, in a child bash: reads only exported variables
  [[ -f $tokenizer/tokenizer.json && -f $data ]] \
    || { echo "e2e: $tokenizer or $data missing: run bash benchmarks/gpu_payload.sh"; return 2; }
  python3 -c "import deepspeed" 2>/dev/null \
    || { echo "e2e: deepspeed not importable: run bash benchmarks/gpu_payload.sh, carry .whl"; return 2; }
  local launcher=(deepspeed)
  command -v deepspeed >/dev/null || launcher=(python3 -m deepspeed.launcher.runner)
  mkdir -p "$run_root"
  python3 benchmarks/gpu_check_e2e.py model --shape "$shape" --tokenizer "$tokenizer" --out "$model_dir" || return
  python3 benchmarks/gpu_check_e2e.py config --shape "$shape" --model "$model_dir" --tokenizer "$tokenizer" \
    --data "$data" --run-dir "$run_dir" --out "$config" --optimizer-impl "$optimizer" || return
  local overrides=()
  read -ra overrides <<<"$overrides_words"
  echo "+ ${launcher[*]} --num_gpus 1 --master_port $port launcher/run.py --config $config ${overrides[*]}"
  "${launcher[@]}" --num_gpus 1 --master_port "$port" launcher/run.py --config "$config" "${overrides[@]}"
}
port=$((29500 + RANDOM % 2000)) optimizer="${GPU_CHECK_OPTIMIZER:-torch}" overrides_words="${GPU_CHECK_OVERRIDES:-}"
export -f e2e
export shape tokenizer data model_dir run_dir run_root config port optimizer overrides_words
e2e_timeout="${GPU_CHECK_E2E_TIMEOUT:-$(( budget - (SECONDS - start) - 20 ))}"
(( e2e_timeout >= 60 )) || e2e_timeout=60
echo "e2e: shape $shape, time limit ${e2e_timeout}s" | tee -a "$e2e_log"
rm -rf "$run_dir" "$model_dir"  # this script's own, from a previous call: never report stale figures
e2e_start=$SECONDS
timeout -k 10 "$e2e_timeout" bash -c 'set -uo pipefail; e2e' 2>&1 | tee -a "$e2e_log"
e2e_rc=$?
e2e_seconds=$((SECONDS - e2e_start))
[[ -f $run_dir/metrics.jsonl ]] && cp "$run_dir/metrics.jsonl" "$out/e2e_metrics.jsonl"
warmup=5; [[ $mode == gpu ]] || warmup=1
python3 benchmarks/gpu_check_e2e.py report --metrics "$run_dir/metrics.jsonl" --skip "$warmup" --goal 0.45 2>&1 \
  | tee -a "$e2e_log"
e2e_line=$(grep '^e2e tokens_per_s=' "$e2e_log" | tail -n 1 | sed 's/^e2e //')

# --- summary ---------------------------------------------------------------------------------
status=$(( wheels_rc != 0 || tests_rc != 0 || bench_rc != 0 || e2e_rc != 0 ))
{
  echo "wheels: $wheels_note"
  echo "tests (rc $tests_rc): ${tests_line:-no pytest summary} -> $tests_log"
  echo "kernel bench (rc $bench_rc, reference checks failed: $checks_failed): ${bench_line:-no headline} -> $bench_log"
  echo "e2e (rc $e2e_rc, ${e2e_seconds}s, shape $shape): ${e2e_line:-no figures} -> $e2e_log"
  [[ $mode == cpu ]] && echo "e2e on CPU: tokens/s of a tiny fp32 model on a CPU; MFU is meaningless there"
  echo "gpu_check mode=$mode wheels_rc=$wheels_rc tests_rc=$tests_rc bench_rc=$bench_rc e2e_rc=$e2e_rc" \
       "${e2e_line:-tokens_per_s=none mfu=none} bench=[${bench_line:-none}] seconds=$((SECONDS - start))"
} | tee "$out/summary.txt"
exit $status
