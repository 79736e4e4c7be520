"""SFTStream read throughput vs training consumption, and start-up cost vs data size.

    python benchmarks/stream_bench.py [--samples 100000] [--steps 20]

1. Builds a synthetic on-disk source (lengths .npy + a sparse token file, both memory-mapped) of
   N and 10N samples, then fresh subprocesses (best of 3) measure start-up time (SFTStream
   construction + first step) and peak RSS. A stream that scans or loads the data would grow ~10x.
2. Read throughput: tokens/s of next_step() for one rank holding the whole global batch.
3. Consumption: tokens/s of a forward+backward of a tiny LlamaForCausalLM (hidden 64, 2 layers,
   vocab 300, fp32, CPU) on the same micro-batch shape: a measured floor on what training eats
   (any real model is slower, so read_over_train only grows on real runs).
Last line: `stream_bench startup_ratio=<x> rss_ratio=<y> read_over_train=<z>`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SEQ_LEN, GBS, MB, VOCAB = 1024, 32, 4, 300


class MmapSource:
    """A SampleSource over `<dir>/lengths.npy` and a flat int32 token file, both memory-mapped."""

    def __init__(self, folder: Path, name: str = "synthetic") -> None:
        self.name = name
        self._lengths = np.load(folder / "lengths.npy", mmap_mode="r")
        self._offsets_file = folder / "offsets.npy"
        self._offsets = np.load(self._offsets_file, mmap_mode="r")
        self._tokens = np.memmap(folder / "tokens.bin", dtype=np.int32, mode="r")

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def get(self, index: int):
        start = int(self._offsets[index])
        ids = self._tokens[start : start + int(self._lengths[index])].astype(np.int64) % VOCAB
        labels = ids.copy()
        labels[: len(ids) // 2] = -100
        return ids, labels


def write_source(folder: Path, samples: int, seed: int = 0) -> None:
    """Lengths ~ the skewed spread of SFT data (16..1024); tokens as a sparse file (no disk cost)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(5.3, 0.8, samples), 16, SEQ_LEN).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)])
    np.save(folder / "lengths.npy", lengths)
    np.save(folder / "offsets.npy", offsets)
    with open(folder / "tokens.bin", "wb") as f:
        f.truncate(int(lengths.sum()) * 4)


def make_stream(folder: Path, total_steps: int = 1000):
    from data_pipeline.spec import SourceSpec
    from data_pipeline.schedule.stream import SFTStream

    source = MmapSource(folder)
    spec = SourceSpec(name=source.name, path=str(folder))
    return SFTStream([source], [spec], seq_len=SEQ_LEN, global_batch_size=GBS, micro_batch_size=MB, rank=0,
                     world_size=1, seed=0, packing=True, pad_id=0, total_steps=total_steps)


def child_startup(folder: Path) -> None:
    """In a fresh process: time to a first step, and peak RSS."""
    import torch  # noqa: F401  (imported before timing: its cost does not depend on the data)

    started = time.perf_counter()
    make_stream(folder).next_step()
    elapsed = time.perf_counter() - started
    print(json.dumps({"startup_s": elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure_in_subprocess(folder: Path, repeats: int = 3) -> dict:
    """Best-of-`repeats` fresh processes: the minimum start-up filters out a busy machine's noise."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", str(folder)], capture_output=True, text=True, env=env, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"startup_s": min(r["startup_s"] for r in runs), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def read_tokens_per_s(folder: Path, steps: int) -> float:
    stream = make_stream(folder)
    stream.next_step()
    started = time.perf_counter()
    for _ in range(steps):
        stream.next_step()
    return steps * GBS * SEQ_LEN / (time.perf_counter() - started)


def train_tokens_per_s(steps: int) -> float:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN)
    model = transformers.LlamaForCausalLM(config).float().train()
    ids = torch.randint(0, VOCAB, (MB, SEQ_LEN))
    mask = torch.ones(MB, 1, SEQ_LEN, SEQ_LEN, dtype=torch.bool).tril()

    def step():
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * MB * SEQ_LEN / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=100_000, help="samples in the 1x data set")
    parser.add_argument("--steps", type=int, default=20, help="steps timed for read/train throughput")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_startup(args.child)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="stream_bench_") as tmp:
        small, large = Path(tmp) / "x1", Path(tmp) / "x10"
        write_source(small, args.samples)
        write_source(large, 10 * args.samples)
        one, ten = measure_in_subprocess(small), measure_in_subprocess(large)
        read = read_tokens_per_s(small, args.steps)
    train = train_tokens_per_s(max(2, args.steps // 4))
    print(f"data 1x={args.samples} samples: startup {one['startup_s']:.3f}s peak RSS {one['peak_rss_mb']:.0f} MB")
    print(f"data 10x={10 * args.samples} samples: startup {ten['startup_s']:.3f}s peak RSS {ten['peak_rss_mb']:.0f} MB")
    print(f"read {read:,.0f} tokens/s (packed rows, rank 0 of 1, gbs={GBS} seq_len={SEQ_LEN})")
    print(f"train {train:,.0f} tokens/s (tiny Llama fwd+bwd on CPU, micro-batch {MB}x{SEQ_LEN})")
    print(f"stream_bench startup_ratio={ten['startup_s'] / one['startup_s']:.2f} "
          f"rss_ratio={ten['peak_rss_mb'] / one['peak_rss_mb']:.2f} read_over_train={read / train:.2f}")


if __name__ == "__main__":
    main()
