"""Which checkpoints to keep: the newest K, plus optionally the best M by an evaluation metric.

Pure functions over (step, metric) records, so the policy is unit-tested without DeepSpeed.
Lower metric is better (an eval loss). A checkpoint without a metric (saved between evaluations)
never counts as "best". The newest checkpoint is always kept: it is what `latest` names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class SavedCheckpoint:
    step: int
    metric: Optional[float] = None
    """The evaluation loss at this step, if the run evaluated right before saving it."""


def best_steps(saved: Sequence[SavedCheckpoint], keep_best: int) -> list[int]:
    """Steps of the keep_best checkpoints with the lowest finite metric (ties: the earlier step)."""
    rated = [c for c in saved if c.metric is not None and math.isfinite(c.metric)]
    rated.sort(key=lambda c: (c.metric, c.step))
    return [c.step for c in rated[:keep_best]]


def steps_to_delete(saved: Sequence[SavedCheckpoint], *, keep_last: int, keep_best: int = 0) -> list[int]:
    """Steps of the checkpoints to delete, oldest first."""
    if keep_last < 1:
        raise ValueError(f"checkpoint.keep_last: must be >= 1, got {keep_last}")
    if keep_best < 0:
        raise ValueError(f"checkpoint.keep_best: must be >= 0, got {keep_best}")
    steps = sorted(c.step for c in saved)
    keep = set(steps[-keep_last:]) | set(best_steps(saved, keep_best))
    return [s for s in steps if s not in keep]
