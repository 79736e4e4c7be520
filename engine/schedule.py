"""The learning-rate schedule: linear warmup to the peak, then cosine decay to lr * min_lr_ratio.

Written here rather than taken from DeepSpeed's WarmupCosineLR, whose ratio is 0 for the first
optimizer steps (its iteration counter starts before the first step), which wastes steps at lr 0.
Here optimizer step s (1-based) trains at
    s <= warmup:  peak * s / warmup
    s >  warmup:  peak * (min + (1 - min) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2)
so the first step already moves, the peak is reached at step `warmup`, and the last step trains
at peak * min_lr_ratio.
"""

from __future__ import annotations

import math

import torch


def lr_ratio(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for 1-based optimizer step `step`."""
    if warmup > 0 and step <= warmup:
        return step / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer, *, warmup: int, total: int, min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR for DeepSpeed: it calls scheduler.step() after every optimizer step, so after k
    completed steps the next one (k + 1) uses lr_ratio(k + 1)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda completed: lr_ratio(completed + 1, warmup=warmup, total=total, min_ratio=min_ratio)
    )
