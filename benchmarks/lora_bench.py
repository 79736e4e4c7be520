"""LoRA against full-parameter SFT on the same model and batches: optimizer state, peak memory, tokens/s.

    python benchmarks/lora_bench.py [--hidden 512] [--layers 8] [--vocab 6400] [--seq 512] [--repeats 2]

Each side runs in a fresh process (so that peak RSS is its own), one DeepSpeed rank, ZeRO-2, fp32,
the project's path: CausalLMWithMaskedLoss (fused masked linear cross-entropy in the lm_head), then
for LoRA `engine.lora.apply_lora` (r 16 on every block projection), then deepspeed.initialize with
only the trainable parameters. Random tokens, half of each row trained. The sides alternate
(full, lora, full, lora, ...) so that drifting machine load hits both; each figure is reported as
the median with its spread over the repeats.

Measured per side: optimizer state (bytes of every tensor DeepSpeed's optimizer holds: Adam moments
and, under ZeRO, the fp32 partitions and gradient buffers), peak RSS of the process (model, data,
activations, optimizer), and tokens/s over the timed steps after warm-up.
Last line: `lora_bench optimizer_state_ratio=<full/lora> peak_rss_ratio=<full/lora> tokens_per_s_ratio=<lora/full>`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state_bytes(obj, seen: set) -> int:
    """Bytes of every distinct tensor reachable from obj (dicts, lists, attributes of the optimizer)."""
    import torch

    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.numel())
        if key in seen or obj.numel() == 0:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v, seen) for v in obj)
    return 0


def optimizer_state_bytes(engine) -> int:
    """The inner torch optimizer's state (moments) plus the ZeRO optimizer's own fp32 copies and buffers."""
    seen: set = set()
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)
    total = _state_bytes(dict(inner.state), seen)
    for attr in ("single_partition_of_fp32_groups", "averaged_gradients", "ipg_buffer"):
        total += _state_bytes(getattr(zero, attr, None), seen)
    return total


def worker(args) -> dict:
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_pipeline.schedule.labels import IGNORE_INDEX
    from engine.config import LoraConfig
    from engine.jit_ops import remove_shm_buffer
    from engine.lora import apply_lora, parameter_counts
    from engine.loss import CausalLMWithMaskedLoss, scaled_for_deepspeed

    torch.manual_seed(0)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=args.seq,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = CausalLMWithMaskedLoss(LlamaForCausalLM(cfg), backend="torch")
    if args.side == "lora":
        model.lm = apply_lora(model.lm, LoraConfig(r=16, alpha=32), base_path="", seed=0)
    trainable, total = parameter_counts(model)
    ds_config = {"train_batch_size": args.micro, "train_micro_batch_size_per_gpu": args.micro,
                 "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
                 "zero_optimization": {"stage": 2}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, args.vocab, (args.micro, args.seq), generator=g)
    labels = input_ids.clone()
    labels[:, : args.seq // 2] = IGNORE_INDEX
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())

    def step() -> None:
        loss_sums, _ = engine(input_ids=input_ids, labels=labels)
        engine.backward(scaled_for_deepspeed(loss_sums.sum(), count, 1, 1))
        engine.step()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    remove_shm_buffer(0)
    return {"side": args.side, "trainable": trainable, "total": total,
            "optimizer_state_bytes": optimizer_state_bytes(engine),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "tokens_per_s": args.steps * args.micro * args.seq / seconds}


def run_side(side: str, args) -> dict:
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    cmd = [sys.executable, __file__, "--worker", side, "--hidden", str(args.hidden), "--layers", str(args.layers),
           "--vocab", str(args.vocab), "--seq", str(args.seq), "--micro", str(args.micro),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=["full", "lora"], help=argparse.SUPPRESS)
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=6400)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if args.worker:
        args.side = args.worker
        result = worker(args)
        print(json.dumps(result))
        return

    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for i in range(args.repeats):
        for side in ("full", "lora") if i % 2 == 0 else ("lora", "full"):
            result = run_side(side, args)
            runs[side].append(result)
            print(f"  {side:4s}: {result['trainable'] / 1e6:.2f}M of {result['total'] / 1e6:.2f}M trainable, "
                  f"optimizer state {result['optimizer_state_bytes'] / 2**20:.1f} MiB, peak RSS "
                  f"{result['peak_rss_bytes'] / 2**20:.0f} MiB, {result['tokens_per_s']:.0f} tokens/s", flush=True)

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    def spread(side: str, key: str) -> str:
        values = [r[key] for r in runs[side]]
        return f"{min(values):.4g}..{max(values):.4g}"

    for key in ("optimizer_state_bytes", "peak_rss_bytes", "tokens_per_s"):
        print(f"{key}: full {med('full', key):.4g} ({spread('full', key)}), lora {med('lora', key):.4g} "
              f"({spread('lora', key)})")
    opt = med("full", "optimizer_state_bytes") / med("lora", "optimizer_state_bytes")
    rss = med("full", "peak_rss_bytes") / med("lora", "peak_rss_bytes")
    tps = med("lora", "tokens_per_s") / med("full", "tokens_per_s")
    print(f"lora_bench optimizer_state_ratio={opt:.2f} peak_rss_ratio={rss:.2f} tokens_per_s_ratio={tps:.2f}")


if __name__ == "__main__":
    main()
