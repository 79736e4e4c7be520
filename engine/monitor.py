"""What a run shows: TensorBoard scalars and text on rank 0, one console progress bar, throughput, MFU.

Other ranks write nothing unless they fail: with 64 ranks, 64 progress bars are noise.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch

# Dense bf16 peak TFLOP/s of one device, for MFU when log.peak_tflops is 0.
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                     "4090": 165.0, "A10": 125.0, "V100": 125.0}


def detect_peak_tflops() -> float:
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    for key, value in KNOWN_PEAK_TFLOPS.items():
        if key in name:
            return value
    return 0.0


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*h*s for attention scores (PaLM)."""
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


class Monitor:
    def __init__(self, run_dir: Path, *, rank: int, enabled_tb: bool, total_steps: int, start_step: int,
                 peak_tflops: float, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.writer = None
        self.bar = None
        self._bar_args = None
        self.peak_tflops = peak_tflops or detect_peak_tflops()
        self._t_last = time.perf_counter()
        if rank != 0:
            return
        self.metrics = open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8")
        if enabled_tb:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
        self._bar_args = dict(total=total_steps, initial=start_step, desc="train", unit="step",
                              dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def log_config(self, config: dict) -> None:
        if self.writer is not None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, ensure_ascii=False) + "\n```", 0)

    def step_timer(self) -> float:
        """Seconds since the last call (the wall time of one optimizer step)."""
        now = time.perf_counter()
        dt, self._t_last = now - self._t_last, now
        return dt

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        if self.rank != 0:
            return
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        # The same scalars as JSON lines: easy to grep, plot or compare across runs.
        self.metrics.write(json.dumps({"step": step, **scalars}) + "\n")
        self.metrics.flush()
        if self.bar is None and self._bar_args is not None:
            from tqdm import tqdm  # created at the first step so that set-up time is not in its rate

            self.bar = tqdm(**self._bar_args)
            self._bar_args = None
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{scalars.get('train/loss', float('nan')):.4f}",
                                 tok_s=f"{scalars.get('perf/tokens_per_s', 0):.0f}", refresh=False)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def print(self, *args) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(" ".join(str(a) for a in args), file=sys.stderr)
        else:
            print(*args, file=sys.stderr)

    def end_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._bar_args = None

    def close(self) -> None:
        if self.rank == 0:
            self.metrics.close()
        self.end_progress()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def memory_scalars() -> dict[str, float]:
    out = {"mem/cpu_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["mem/gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def mfu(tokens_per_s_per_rank: float, flops_tok: float, peak_tflops: float) -> Optional[float]:
    if peak_tflops <= 0:
        return None
    return tokens_per_s_per_rank * flops_tok / (peak_tflops * 1e12)
