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

import numpy as np
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
    """Training FLOPs per token (PaLM, appendix B): 6N + 12*L*h*s.

    6N: each weight of a matmul does one multiply-add (2 FLOPs) per token forward and two backward
    (input and weight gradients). N must count matmul weights only (`matmul_parameters`): the input
    embedding is a table lookup. 12*L*h*s: per layer QK^T and AV are each 2*h*s FLOPs forward per
    token, times 3 for forward + backward, s the keys a token's square spans (`attention_context`)."""
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


def attention_context(lengths: list, seq_len: int) -> float:
    """The `s` of flops_per_token for samples that attend within themselves only (packed rows keep
    samples apart; unpacked ones are single samples): a token of a sample of length l sees an l x l
    square, so the token-weighted mean is sum(l^2) / sum(l). Counting the whole seq_len x seq_len
    square of a packed row would credit work no kernel should do (MFU then overstated)."""
    total = sum(float(np.asarray(x, dtype=np.float64).sum()) for x in lengths)
    if total == 0:
        return float(seq_len)
    squares = sum(float(np.square(np.asarray(x, dtype=np.float64)).sum()) for x in lengths)
    return min(float(seq_len), squares / total)


def matmul_parameters(model: torch.nn.Module) -> int:
    """Weights (and biases) of the model's Linear layers, the lm_head included, tied or not.

    Not `count_parameters`: an untied input embedding is a lookup, not a matmul, and would inflate
    MFU by 6*vocab*hidden FLOPs per token (a third of the total for a 0.5B model)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for p in module.parameters(recurse=False):
                if id(p) not in seen:  # a tied weight is one matmul per use, counted once per module
                    seen.add(id(p))
                    total += getattr(p, "ds_numel", p.numel())
    return total


def quiet_library_logging(rank: int, deepspeed_level: str) -> None:
    """One console voice. DeepSpeed's logger gets `deepspeed_level` on every rank (warnings and
    errors still show everywhere: a failing rank must be heard). Python deprecation warnings from
    libraries repeat identically on every rank, so ranks other than 0 drop them."""
    import warnings

    from deepspeed.utils import logger as ds_logger
    from deepspeed.utils.logging import set_log_level_from_string

    set_log_level_from_string(deepspeed_level, custom_logger=ds_logger)
    if rank != 0:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars, one per rank otherwise


def flatten_for_hparams(config: dict, prefix: str = "") -> dict[str, object]:
    """Nested config -> {"train.lr": 0.001, ...}: the hparams plugin takes scalars and strings only."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_for_hparams(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is None:
            flat[name] = "none"
        else:  # lists (sources, prompts, stages): one readable string
            flat[name] = json.dumps(value, ensure_ascii=False, default=str)
    return flat


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

    def log_config(self, config: dict, metric_tags: tuple[str, ...] = ("train/loss",)) -> None:
        """The run config as text and as hparams (one row per run in the HPARAMS tab, with the
        final value of each metric tag, so runs of a sweep compare side by side)."""
        if self.writer is None:
            return
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, ensure_ascii=False) + "\n```", 0)
        from torch.utils.tensorboard.summary import hparams

        # Written into this run's own event file (SummaryWriter.add_hparams would open a new run
        # folder per call); the metric values are read from the run's scalars of these tags.
        for summary in hparams(flatten_for_hparams(config), {tag: 0.0 for tag in metric_tags}):
            self.writer.file_writer.add_summary(summary)

    def log_model_size(self, trainable: int, total: int) -> None:
        """Trainable and total parameters (LoRA trains a share) in TensorBoard, once per run; not
        in metrics.jsonl, whose lines are steps."""
        if self.rank != 0 or self.writer is None:
            return
        self.writer.add_scalar("model/parameters", total, 0)
        self.writer.add_scalar("model/trainable_parameters", trainable, 0)
        self.writer.add_text("model", f"{trainable:,} of {total:,} parameters trainable "
                                      f"({trainable / max(total, 1):.2%})", 0)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Scalars to TensorBoard and, as one JSON line, to metrics.jsonl (easy to grep, plot or
        compare across runs). Evaluation calls this directly: no progress bar update."""
        if self.rank != 0:
            return
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        self.metrics.write(json.dumps({"step": step, **scalars}) + "\n")
        self.metrics.flush()

    def step_timer(self) -> float:
        """Seconds since the last call (the wall time of one optimizer step)."""
        now = time.perf_counter()
        dt, self._t_last = now - self._t_last, now
        return dt

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        """One optimizer step's scalars (TensorBoard and metrics.jsonl) and the progress bar."""
        if self.rank != 0:
            return
        self.log_scalars(step, scalars)
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
