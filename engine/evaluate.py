"""Evaluation: token-weighted loss of each eval set, over the micro-batches each rank is given.

The figure is the same one training minimises (engine/loss.py): per eval set,
    sum of response-token cross-entropy over the whole set / number of response tokens in it,
computed through the DeepSpeed engine's forward (the fused masked loss, ZeRO-3 gathering included)
in eval mode without gradients. Each rank contributes (sum, count) of its own micro-batches; one
all-reduce of all sets' pairs gives the exact set-wide mean. Averaging per-rank or per-batch means
instead would weight a token of a short answer more than one of a long answer, and the figure
would change with the world size.

Which samples a rank evaluates, how they are packed, and the filler batches that keep every rank's
number of forwards equal under ZeRO-3 are the data pipeline's (data_pipeline/schedule/eval_batches.py).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from data_pipeline.schedule.batch import MicroBatch


def all_reduce_sums(loss_sums: Sequence[float], counts: Sequence[int]) -> tuple[list[float], list[int]]:
    """Sum every set's (loss sum, token count) over ranks in one float64 all-reduce."""
    n = len(loss_sums)
    packed = torch.tensor(list(loss_sums) + [float(c) for c in counts], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
    values = packed.tolist()
    return values[:n], [int(round(c)) for c in values[n:]]


def token_weighted(names: Sequence[str], loss_sums: Sequence[float], counts: Sequence[int]) -> dict[str, float]:
    """eval/<name>/loss and eval/<name>/tokens per set, and eval/loss over all sets' tokens."""
    out: dict[str, float] = {}
    for name, total, count in zip(names, loss_sums, counts):
        if count:
            out[f"eval/{name}/loss"] = total / count
        out[f"eval/{name}/tokens"] = float(count)
    if sum(counts):
        out["eval/loss"] = sum(loss_sums) / sum(counts)
    return out


def evaluate(engine, batches_by_set: Sequence[tuple[str, Iterable[MicroBatch]]]) -> dict[str, float]:
    """Token-weighted eval loss of every set (identical on every rank). Every rank must call it,
    each with its own micro-batches of every set (the same number of them on every rank)."""
    if not batches_by_set:
        return {}
    was_training = engine.module.training
    engine.eval()
    loss_sums, counts = [], []
    try:
        with torch.no_grad():
            for _, batches in batches_by_set:
                total, count = 0.0, 0
                for batch in batches:
                    # per_source=False: one set is one loss, whatever source ids the rows carry.
                    batch_sums, batch_counts = engine(**batch.to(engine.device).model_inputs(per_source=False))
                    total += float(batch_sums.double().sum())
                    count += int(batch_counts.sum())
                loss_sums.append(total)
                counts.append(count)
    finally:
        if was_training:
            engine.train()
    loss_sums, counts = all_reduce_sums(loss_sums, counts)
    return token_weighted([name for name, _ in batches_by_set], loss_sums, counts)
