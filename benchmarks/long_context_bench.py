"""Long-context SFT with and without sequence parallelism: activation memory per rank and tokens/s
against sequence length, the longest sequence under a fixed per-rank memory cap, and a 16k-token
sample trained end to end through the launcher.

    python benchmarks/long_context_bench.py [--lengths 4096,8192,...] [--cap-at 16384] [--e2e-length 16384]

1. Curve: `deepspeed --num_gpus 2` runs this file as a worker once per setting (sp=1: each rank its
   own sequence, data-parallel; sp=2: both ranks share each sequence, Ulysses). The worker builds a
   small Llama (hidden 256, 4 layers, 4 heads, fp32) through the project's path (fused masked loss,
   engine/sequence_parallel.py, ZeRO-2) and trains one step per length on one sample of that
   length, half of it trained. Before each step it resets the process's peak RSS (Linux
   /proc/self/clear_refs) and reads it after: the step's own memory (activations, gradients,
   optimizer), per rank, the largest rank reported. The settings alternate (sp=1, sp=2, ...).
2. Cap: the memory sp=1 needs at --cap-at tokens; the longest length of the grid each setting
   trains within it. Goal: sp=2 holds sequences >= 1.8x as long.
3. End to end: `launcher/run.py` on 2 ranks, train.sequence_parallel=2, one alpaca sample of
   --e2e-length tokens (character-level tokenizer trained on it), two steps.
Last line: `long_context_bench length_ratio=<sp2 longest / sp1 longest>`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HIDDEN, LAYERS, HEADS, VOCAB = 256, 4, 4, 512


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Hand freed heap memory back to the OS (else the previous, longer step's cached memory would
    hide this step's), then reset the peak RSS (VmHWM) to the current RSS."""
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def worker(args) -> None:
    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_pipeline.schedule.collate import LoadedSample, collate_rows
    from data_pipeline.schedule.labels import IGNORE_INDEX, count_targets
    from engine.jit_ops import remove_shm_buffer
    from engine.loss import CausalLMWithMaskedLoss, scaled_for_deepspeed
    from engine.sequence_parallel import SequenceParallelLayout, UlyssesAttention
    from engine.tiled_mlp import install_tiled_mlp

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = SequenceParallelLayout.of(rank, world, args.sp)
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=HIDDEN * 8 // 3 // 8 * 8,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                      max_position_embeddings=max(lengths), tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    lm = LlamaForCausalLM(cfg)
    if args.checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = CausalLMWithMaskedLoss(lm, backend="torch")
    if args.tiled_mlp:
        install_tiled_mlp(model.lm, args.tiled_mlp)
    ulysses = UlyssesAttention(model.lm, args.sp, 1) if layout.enabled else None
    ds_config = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
                 "zero_optimization": {"stage": 2}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    g = np.random.default_rng(layout.group)
    results = []
    for i, length in enumerate([lengths[0]] + lengths):  # the first: warm-up (optimizer state, allocator)
        ids = g.integers(3, VOCAB, length)
        labels = ids.copy()
        labels[: length // 2] = IGNORE_INDEX
        # one sample per row: no mask needed either way (sp=1 then runs causal SDPA, linear in memory)
        mb = collate_rows([[LoadedSample(0, 0, ids, labels)]], length, 0, "none")
        count = torch.tensor([count_targets(mb.labels) if layout.rank == 0 else 0])
        dist.all_reduce(count)
        if layout.enabled:
            mb = mb.sequence_shard(layout.rank, layout.size)
        dist.barrier()
        _reset_peak_rss()
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        loss, _ = engine(**mb.model_inputs())
        engine.backward(scaled_for_deepspeed(loss.sum(), int(count), world, 1))
        engine.step()
        seconds = time.perf_counter() - start
        step_kib = torch.tensor([_status_kib("VmHWM") - before, seconds * 1e6], dtype=torch.float64)
        dist.all_reduce(step_kib, op=dist.ReduceOp.MAX)
        # tokens trained per second by the whole job: sp=1 trains `world` sequences, sp=2 one per group
        if i == 0:
            continue
        results.append({"length": length, "step_mib": step_kib[0].item() / 1024,
                        "tokens_per_s": length * layout.groups / (step_kib[1].item() / 1e6)})
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    if ulysses is not None:
        ulysses.restore()
    dist.barrier()
    remove_shm_buffer(rank)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_curve(sp: int, lengths: list[int], tiled_mlp: int, checkpointing: bool) -> list[dict]:
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), __file__, "--worker",
           "--sp", str(sp), "--lengths", ",".join(map(str, lengths)), "--tiled-mlp", str(tiled_mlp)]
    cmd += ["--checkpointing"] if checkpointing else []
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"sp={sp} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def run_end_to_end(length: int) -> str:
    """One alpaca sample of ~length tokens through launcher/run.py with train.sequence_parallel=2."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="long-context-") as tmp:
        rng = random.Random(0)
        chars = [chr(c) for c in range(0x4E00, 0x4E00 + 60)]  # few enough that each is one token
        record = {"instruction": "复述下面的文字。", "input": "",
                  "output": "".join(rng.choice(chars) for _ in range(length - 64))}
        data = Path(tmp) / "long.jsonl"
        data.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
        cfg = {
            "run_dir": str(Path(tmp) / "run"),
            "model": {"from_scratch": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                                       "num_key_value_heads": 2, "intermediate_size": 344,
                                       "max_position_embeddings": length}},
            "tokenizer": {"vocab_size": 400, "cjk_char_level": True},
            "data": {"sources": [{"name": "long", "path": str(data), "format": "alpaca"}], "seq_len": length,
                     "packing": False, "num_proc": 1},
            "train": {"micro_batch_size": 1, "global_batch_size": 1, "max_steps": 2, "lr": 1e-3, "warmup_steps": 1,
                      "sequence_parallel": 2, "tiled_mlp": 4, "deepspeed": "configs/ds/zero2.json"},
            "checkpoint": {"every_steps": 0, "export_at_end": False},
            "log": {"every_steps": 1, "tensorboard": False, "sample_prompts": []},
        }
        config = Path(tmp) / "run.yaml"
        config.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
        start = time.perf_counter()
        proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()),
                               str(REPO / "launcher" / "run.py"), "--config", str(config)],
                              cwd=REPO, env=_env(), capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"end-to-end run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
        metrics = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines() if x]
        steps = [m for m in metrics if "train/loss" in m]
        tokens = sum(m.get("source/long/tokens", 0) for m in steps)
        model_line = next(x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("model:"))
        losses = ", ".join(f"{m['train/loss']:.3f}" for m in steps)
        return (f"end to end: {len(steps)} steps of one {tokens // max(len(steps), 1)}-token sample, losses "
                f"{losses}, {seconds:.0f} s with start-up; {model_line}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--lengths", default="4096,8192,12288,16384,24576,32768")
    p.add_argument("--tiled-mlp", type=int, default=0, help="TiledMLP shards in the curve (0 = off)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the curve")
    p.add_argument("--cap-at", type=int, default=16384, help="the cap: what sp=1 needs at this length")
    p.add_argument("--e2e-length", type=int, default=16384)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    lengths = [int(x) for x in args.lengths.split(",")]
    curves = {}
    for sp in (1, 2):
        curves[sp] = run_curve(sp, lengths, args.tiled_mlp, args.checkpointing)
        for row in curves[sp]:
            print(f"  sp={sp} length {row['length']:6d}: step memory per rank {row['step_mib']:8.1f} MiB, "
                  f"{row['tokens_per_s']:8.0f} tokens/s", flush=True)
    cap = next(r["step_mib"] for r in curves[1] if r["length"] == args.cap_at)
    longest = {sp: max((r["length"] for r in curves[sp] if r["step_mib"] <= cap), default=0) for sp in (1, 2)}
    print(f"cap {cap:.0f} MiB per rank (sp=1 at {args.cap_at}): longest sp=1 {longest[1]}, sp=2 {longest[2]}")
    if args.e2e_length:
        print(run_end_to_end(args.e2e_length), flush=True)
    print(f"long_context_bench length_ratio={longest[2] / max(longest[1], 1):.2f}")


if __name__ == "__main__":
    main()
