"""Evaluation: token-weighted loss on held-out splits and named eval sources, on every rank.

The figure is the same one training minimises (engine/loss.py): per eval set,
    sum of response-token cross-entropy over the whole set / number of response tokens in it,
computed through the DeepSpeed engine's forward (the fused masked loss, ZeRO-3 gathering included)
in eval mode without gradients. Each rank evaluates the samples i with i % world_size == rank and
contributes (sum, count); one all-reduce of all sets' pairs gives the exact set-wide mean. Averaging
per-rank or per-batch means instead would weight a token of a short answer more than one of a long
answer, and the figure would change with the world size.

Under ZeRO-3 every forward is collective (parameters are gathered module by module), so every rank
runs the same number of forwards: a rank whose share is used up runs filler batches that hold no
target token and contribute (0, 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.collate import LoadedSample, collate_rows
from data_pipeline.spec import SampleSource, SourceSpec
from data_pipeline.split import split_source

EVAL_INPUT_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")


@dataclass(frozen=True)
class EvalSet:
    """One evaluated set: a held-out split of a training source, or a named eval source."""

    name: str
    source: SampleSource


def split_training_sources(sources: Sequence[SampleSource], specs: Sequence[SourceSpec],
                           key: str = "data.sources") -> tuple[list[SampleSource], list[EvalSet]]:
    """(what trains, the held-out eval sets): sources with eval_fraction/eval_count are split."""
    training, held_out = [], []
    for i, (source, spec) in enumerate(zip(sources, specs)):
        train_view, eval_view = split_source(source, spec, f"{key}[{i}]")
        training.append(train_view)
        if eval_view is not None:
            held_out.append(EvalSet(spec.name, eval_view))
    return training, held_out


def rank_rows(lengths: np.ndarray, rank: int, world_size: int, seq_len: int) -> list[list[int]]:
    """This rank's samples (i % world_size == rank), packed in order into rows of <= seq_len tokens
    (next-fit). Packing changes no loss (DESIGN invariant 3) and saves most of the padding."""
    rows: list[list[int]] = []
    used = seq_len  # forces a new row for the first sample
    for index in range(rank, len(lengths), world_size):
        n = int(lengths[index])
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += n
    return rows


def forwards_needed(lengths: np.ndarray, world_size: int, seq_len: int, micro_batch_size: int) -> int:
    """Forwards the busiest rank needs; every rank computes the same figure from the lengths alone."""
    busiest = max(len(rank_rows(lengths, r, world_size, seq_len)) for r in range(world_size))
    return math.ceil(busiest / micro_batch_size)


def filler_batch(pad_id: int, mask_format: str) -> dict:
    """One row of one padding token and no target: a forward that adds (0, 0) to the sums."""
    sample = LoadedSample(0, 0, np.array([pad_id], dtype=np.int64), np.array([-100], dtype=np.int64))
    return collate_rows([[sample]], 1, pad_id, mask_format)


def rank_batches(source: SampleSource, *, rank: int, world_size: int, seq_len: int, micro_batch_size: int,
                 pad_id: int, mask_format: str) -> Iterator[dict]:
    """This rank's eval micro-batches, filler-padded to the number every rank runs. A generator:
    one micro-batch (and its [mb, 1, L, L] mask) in memory at a time, whatever the set's size."""
    lengths = np.asarray(source.lengths)
    rows = rank_rows(lengths, rank, world_size, seq_len)
    produced = 0
    for start in range(0, len(rows), micro_batch_size):
        chunk = rows[start:start + micro_batch_size]
        loaded = [[LoadedSample(0, i, *map(np.asarray, source.get(i))) for i in row] for row in chunk]
        pad_to = max(sum(len(s.input_ids) for s in row) for row in loaded)
        produced += 1
        yield collate_rows(loaded, pad_to, pad_id, mask_format)
    for _ in range(forwards_needed(lengths, world_size, seq_len, micro_batch_size) - produced):
        yield filler_batch(pad_id, mask_format)


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


def evaluate(engine, eval_sets: Sequence[EvalSet], *, rank: int, world_size: int, seq_len: int,
             micro_batch_size: int, pad_id: int, mask_format: str = "bool") -> dict[str, float]:
    """Token-weighted eval loss of every set (identical on every rank). Every rank must call it."""
    if not eval_sets:
        return {}
    was_training = engine.module.training
    engine.eval()
    loss_sums, counts = [], []
    try:
        with torch.no_grad():
            for eval_set in eval_sets:
                total, count = 0.0, 0
                for batch in rank_batches(eval_set.source, rank=rank, world_size=world_size, seq_len=seq_len,
                                          micro_batch_size=micro_batch_size, pad_id=pad_id, mask_format=mask_format):
                    # No source_index: one set is one loss, whatever source ids the rows carry.
                    inputs = {k: v.to(engine.device) for k, v in batch.items() if k in EVAL_INPUT_KEYS}
                    batch_sums, batch_counts = engine(**inputs)
                    total += float(batch_sums.double().sum())
                    count += int(batch_counts.sum())
                loss_sums.append(total)
                counts.append(count)
    finally:
        if was_training:
            engine.train()
    loss_sums, counts = all_reduce_sums(loss_sums, counts)
    return token_weighted([s.name for s in eval_sets], loss_sums, counts)
