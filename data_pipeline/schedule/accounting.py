"""Per-source counts of one step's micro-batches (this rank's share; the trainer all-reduces)."""

from __future__ import annotations

from typing import Sequence

import torch

from data_pipeline.schedule.batch import MicroBatch, SampleId
from data_pipeline.schedule.labels import IGNORE_INDEX


def source_counts(micro_batches: Sequence[MicroBatch], num_sources: int) -> dict[str, list[int]]:
    """{"samples", "tokens", "response_tokens"}: one list of num_sources ints each.

    tokens counts every non-padding token; response_tokens counts the tokens that train
    (labels != IGNORE_INDEX), which is what the loss normaliser sums (data_pipeline/schedule/labels.py)."""
    samples = [0] * num_sources
    tokens = torch.zeros(num_sources, dtype=torch.int64)
    response = torch.zeros(num_sources, dtype=torch.int64)
    for batch in micro_batches:
        for row in batch.sample_ids:
            for source, _ in row:
                samples[source] += 1
        source_index = batch.source_index
        real = source_index >= 0
        tokens += torch.bincount(source_index[real], minlength=num_sources)
        trained = real & (batch.labels != IGNORE_INDEX)
        response += torch.bincount(source_index[trained], minlength=num_sources)
    return {"samples": samples, "tokens": tokens.tolist(), "response_tokens": response.tolist()}


def consumed_sample_ids(micro_batches: Sequence[MicroBatch]) -> list[SampleId]:
    """(source index, sample index) of every sample in the micro-batches, in row order."""
    return [sample_id for batch in micro_batches for row in batch.sample_ids for sample_id in row]
