"""What evaluation reads: the eval sets, and each rank's micro-batches of a set.

Eval sets are held-out splits of training sources (data.sources[i].eval_fraction / eval_count,
taken out before the schedule sees them) and named eval sources (data.eval_sources).

Batching: rank r evaluates the samples i with i % world_size == r, packed in order into rows of
<= seq_len tokens (packing.pack_next_fit), laid out by collate.py like training micro-batches
(MicroBatch). Under ZeRO-3 every forward is collective (parameters are gathered module by module),
so every rank must run the same number of forwards: a rank whose share is used up gets filler
batches that hold no target token and contribute (0, 0) to the sums. Every rank computes that
number from the lengths alone, so no communication is needed to agree on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from data_pipeline.schedule.batch import MicroBatch
from data_pipeline.schedule.collate import LoadedSample, collate_padding_free, collate_rows, filler_batch
from data_pipeline.schedule.packing import pack_next_fit
from data_pipeline.spec import SampleSource, SourceSpec
from data_pipeline.selection.split import split_source


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
    """This rank's samples (i % world_size == rank), packed in order into rows of <= seq_len tokens."""
    return pack_next_fit(range(rank, len(lengths), world_size), lengths, seq_len)


def forwards_needed(lengths: np.ndarray, world_size: int, seq_len: int, micro_batch_size: int) -> int:
    """Forwards the busiest rank needs; every rank computes the same figure from the lengths alone."""
    busiest = max(len(rank_rows(lengths, r, world_size, seq_len)) for r in range(world_size))
    return math.ceil(busiest / micro_batch_size)


def rank_batches(source: SampleSource, *, rank: int, world_size: int, seq_len: int, micro_batch_size: int,
                 pad_id: int, mask_format: str = "bool", padding_free: bool = False) -> Iterator[MicroBatch]:
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
        yield collate_padding_free(loaded, pad_id) if padding_free else collate_rows(loaded, pad_to, pad_id, mask_format)
    for _ in range(forwards_needed(lengths, world_size, seq_len, micro_batch_size) - produced):
        yield filler_batch(pad_id, "none" if padding_free else mask_format)


def eval_batches(eval_sets: Sequence[EvalSet], *, rank: int, world_size: int, seq_len: int,
                 micro_batch_size: int, pad_id: int, mask_format: str = "bool",
                 padding_free: bool = False) -> list[tuple[str, Iterator[MicroBatch]]]:
    """(name, this rank's micro-batches) per set, in order; the batches are read lazily."""
    return [(s.name, rank_batches(s.source, rank=rank, world_size=world_size, seq_len=seq_len,
                                  micro_batch_size=micro_batch_size, pad_id=pad_id, mask_format=mask_format,
                                  padding_free=padding_free))
            for s in eval_sets]
