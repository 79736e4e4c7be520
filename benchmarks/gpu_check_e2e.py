"""The end-to-end part of benchmarks/gpu_check.sh: a Qwen2.5-0.5B-shaped model with random weights,
trained through the launcher like any run, and its throughput read back from metrics.jsonl.

    python benchmarks/gpu_check_e2e.py model  --shape qwen2.5-0.5b --tokenizer DIR --out DIR
    python benchmarks/gpu_check_e2e.py config --shape qwen2.5-0.5b --model DIR --tokenizer DIR \
        --data FILE --run-dir DIR --out FILE.yaml
    python benchmarks/gpu_check_e2e.py report --metrics RUN_DIR/metrics.jsonl --skip 5 --goal 0.45

Shapes: qwen2.5-0.5b (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151,936, tied
embeddings, rope theta 1e6: Qwen2.5-0.5B's config; bf16, seq_len 4096, packed) and tiny (the same
family, 2 layers, hidden 128, vocab 151,936 kept; fp32, seq_len 256: for a CPU).

Why a model directory and not model.from_scratch: from scratch, the vocabulary is the tokenizer's
(6,400 tokens for the carried tokenizer), while the lm_head of a 151,936-token vocabulary is a
quarter of Qwen2.5-0.5B's matmul FLOPs and the fused loss's whole work. So `model` writes a
Qwen2 config with Qwen2.5-0.5B's numbers and randomly initialised weights as a HF directory, which
the run loads through model.path; the tokenizer's ids (< 6,400) all fall inside the vocabulary.

`report` averages over the steps after the first `--skip` (warm-up: CUDA/Triton compilation,
autotuning, allocator growth): tokens/s as total tokens over total step time, MFU likewise (the
trainer's perf/mfu: tokens/s per rank x (6N + 12 L h s) FLOPs per token / the device's peak).
Its last line is `e2e tokens_per_s=... mfu=...`, read by gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SHAPES = {
    "qwen2.5-0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "intermediate_size": 4864, "vocab_size": 151936, "max_position_embeddings": 32768},
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 384, "vocab_size": 151936, "max_position_embeddings": 4096},
}
# The run per shape: one H200 (bf16, 4096-token packed rows, 8 rows per micro-batch, 2 micro-batches
# per step: ~64k tokens a step) and a CPU (fp32, short rows, a few steps).
RUNS = {
    "qwen2.5-0.5b": {"dtype": "bf16", "seq_len": 4096, "micro_batch_size": 8, "global_batch_size": 16, "max_steps": 50},
    "tiny": {"dtype": "fp32", "seq_len": 256, "micro_batch_size": 2, "global_batch_size": 4, "max_steps": 5},
}


def write_model(shape: str, tokenizer_dir: str, out: Path) -> None:
    import inspect

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    numbers = dict(SHAPES[shape])
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    if "rope_parameters" not in inspect.signature(Qwen2Config.__init__).parameters:
        rope = {"rope_theta": 1e6}
    config = Qwen2Config(**numbers, **rope, tie_word_embeddings=True, rms_norm_eps=1e-6, hidden_act="silu",
                         use_sliding_window=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens, more than the vocabulary {config.vocab_size}")
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 0.5B weights: seconds on a GPU
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    dtype = torch.bfloat16 if RUNS[shape]["dtype"] == "bf16" else torch.float32
    model.to(dtype).save_pretrained(str(out))
    n = sum(p.numel() for p in model.parameters())
    print(f"model {shape}: {n / 1e6:.1f}M parameters (tied), random init, saved as {dtype} to {out}")


def write_config(args: argparse.Namespace) -> None:
    import yaml

    run = RUNS[args.shape]
    config = {
        "run_dir": args.run_dir,
        "model": {"path": args.model, "dtype": run["dtype"], "attn_implementation": "sdpa"},
        "tokenizer": {"path": args.tokenizer},
        "data": {
            "sources": [{"name": "alpaca_zh", "path": args.data, "format": "alpaca"}],
            "template": "chatml",
            "train_on": "all_assistant",
            "seq_len": run["seq_len"],
            "packing": True,
        },
        "train": {
            "kind": "sft",
            "micro_batch_size": run["micro_batch_size"],
            "global_batch_size": run["global_batch_size"],
            "max_steps": run["max_steps"],
            "lr": 1.0e-4,
            "warmup_steps": 2,
            "deepspeed": "configs/ds/zero2.json",
            # DeepSpeed's fused_adam would first compile for 1-2 minutes; torch's AdamW on ZeRO-2's
            # flat fp32 partition costs milliseconds a step.
            "optimizer_impl": args.optimizer_impl,
        },
        "eval": {"at_end": False},
        "checkpoint": {"resume": "none", "keep_last": 1, "export_at_end": False},
        "log": {"every_steps": 1, "tensorboard": False},
    }
    header = (f"# Generated by benchmarks/gpu_check_e2e.py (shape {args.shape}) for benchmarks/gpu_check.sh:\n"
              f"#   deepspeed --num_gpus 1 launcher/run.py --config {args.out}\n")
    Path(args.out).write_text(header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    print(f"config {args.out}: " + json.dumps({k: v for k, v in run.items()}))


def report(metrics: Path, skip: int, goal: float) -> int:
    import torch

    from engine.monitor import detect_peak_tflops

    rows = []
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "perf/tokens_per_s" in record and "perf/step_seconds" in record:
                rows.append(record)
    if not rows:
        print(f"e2e: no step in {metrics}")
        print("e2e tokens_per_s=none mfu=none goal=unmet")
        return 1
    measured = rows[skip:] if len(rows) > skip else rows
    excluded = len(rows) - len(measured)
    seconds = sum(r["perf/step_seconds"] for r in measured)
    tokens = sum(r["perf/tokens_per_s"] * r["perf/step_seconds"] for r in measured)
    tokens_per_s = tokens / seconds
    print(f"e2e: {len(rows)} steps logged; steps {measured[0]['step']}-{measured[-1]['step']} measured, "
          + (f"the first {excluded} excluded (warm-up: kernel compilation and autotuning, allocator growth)" if excluded
             else f"none excluded (no more steps than the {skip} warm-up steps to exclude)"))
    per_step = [r["perf/tokens_per_s"] for r in measured]
    print(f"e2e: tokens/s {tokens_per_s:,.0f} (total tokens / total step time; per step median "
          f"{statistics.median(per_step):,.0f}, min {min(per_step):,.0f}, max {max(per_step):,.0f}); "
          f"{tokens / len(measured):,.0f} tokens and {seconds / len(measured):.3f} s a step")
    print(f"e2e: loss {rows[0]['train/loss']:.4f} at step {rows[0]['step']} -> {rows[-1]['train/loss']:.4f} at step "
          f"{rows[-1]['step']}; peak GPU memory "
          + (f"{max(r.get('mem/gpu_max_allocated_gb', 0.0) for r in rows):.1f} GiB"
             if any("mem/gpu_max_allocated_gb" in r for r in rows) else "n/a"))
    with_mfu = [r for r in measured if r.get("perf/mfu") is not None]
    if not with_mfu:
        why = ("MFU is meaningless on a CPU: no peak is known, and the trainer logs none"
               if not torch.cuda.is_available() else
               f"no peak TFLOP/s known for {torch.cuda.get_device_name()} (set log.peak_tflops)")
        print(f"e2e: MFU n/a ({why}); goal MFU >= {goal:.0%} (on one H200): not measured")
        print(f"e2e tokens_per_s={tokens_per_s:.0f} mfu=n/a goal=not_measured")
        return 0
    # perf/mfu is proportional to perf/tokens_per_s (one FLOPs-per-token figure and one peak), so the
    # token-weighted MFU is the mean tokens/s times that ratio.
    ratio = statistics.median(r["perf/mfu"] / r["perf/tokens_per_s"] for r in with_mfu)
    util = tokens_per_s * ratio
    peak = detect_peak_tflops()
    flops_tok = ratio * peak * 1e12 if peak else float("nan")
    met = util >= goal
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "?"
    median = statistics.median(r["perf/mfu"] for r in with_mfu)
    print(f"e2e: MFU {util:.1%} over the measured steps (per step median {median:.1%}); {flops_tok / 1e9:.2f} GFLOP "
          f"per token (6N + 12 L h s), peak {peak:g} TFLOP/s dense bf16 ({device})")
    print(f"e2e: goal MFU >= {goal:.0%}: {'met' if met else 'NOT met'} (the 12 L h s term counts the whole s x s "
          f"attention square of each packed row, as a dense kernel computes it)")
    print(f"e2e tokens_per_s={tokens_per_s:.0f} mfu={util:.1%} goal={'met' if met else 'unmet'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model", help="write a randomly initialised Qwen2 model directory")
    m.add_argument("--shape", choices=sorted(SHAPES), required=True)
    m.add_argument("--tokenizer", required=True)
    m.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("config", help="write the run config")
    c.add_argument("--shape", choices=sorted(SHAPES), required=True)
    for name in ("--model", "--tokenizer", "--data", "--run-dir", "--out"):
        c.add_argument(name, required=True)
    c.add_argument("--optimizer-impl", default="torch")
    r = sub.add_parser("report", help="tokens/s and MFU from a run's metrics.jsonl")
    r.add_argument("--metrics", type=Path, required=True)
    r.add_argument("--skip", type=int, default=5)
    r.add_argument("--goal", type=float, default=0.45)
    args = parser.parse_args()
    if args.command == "model":
        write_model(args.shape, args.tokenizer, args.out)
    elif args.command == "config":
        write_config(args)
    else:
        return report(args.metrics, args.skip, args.goal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
