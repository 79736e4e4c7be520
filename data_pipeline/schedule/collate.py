"""Rows of samples -> the micro-batch tensors the model and the loss consume.

Per row, samples are laid end to end and padded on the right, into a MicroBatch (batch.py).
labels follow data_pipeline/schedule/labels.py: unshifted, and the first token of every sample does not
train (`sample_labels`), so after the loss's shift the last token of sample A never learns to
predict the first token of sample B. position_ids restart at 0 per sample (rotary embeddings then
see each sample as if alone).

attention_mask formats (verified against the installed transformers' LlamaForCausalLM on CPU):
  * "bool"     [mb, 1, L, L] bool, True = may attend: block-diagonal causal. HF returns a 4-D mask
               unchanged to the attention kernel; exact with attn_implementation="sdpa" (the HF
               default) and flex; any dtype, 1 byte per entry. NOT correct with "eager", which adds
               the mask to the scores (use "additive" there).
  * "additive" [mb, 1, L, L] float32, 0 where allowed and the dtype minimum elsewhere: exact with
               "eager" and with "sdpa" in fp32 (cast to the model dtype for bf16 sdpa).
  * "none"     attention_mask=None: for flash_attention_2 on GPU, where HF detects packing from
               position_ids resets and runs the varlen kernel; HF only does this for one row per
               micro-batch (micro_batch_size=1). On CPU sdpa/eager this is NOT block-diagonal.
Padding tokens form their own causal segment, so every query row keeps one allowed key (a fully
masked row would make softmax NaN and poison the backward pass even though nothing there trains).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from data_pipeline.schedule.batch import MicroBatch
from data_pipeline.schedule.labels import IGNORE_INDEX, sample_labels

MASK_FORMATS = ("bool", "additive", "none")


@dataclass(frozen=True)
class LoadedSample:
    """One sample read from its source, with its global id."""

    source: int
    index: int
    input_ids: np.ndarray
    labels: np.ndarray


def block_diagonal_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[mb, L] segment ids -> [mb, 1, L, L] bool: query t sees key u iff u <= t, same segment."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same_segment & causal)[:, None]


def collate_rows(rows: Sequence[Sequence[LoadedSample]], pad_to: int, pad_id: int,
                 mask_format: str = "bool") -> MicroBatch:
    """Lay out `rows` (each a list of samples) into right-padded [len(rows), pad_to] tensors."""
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format: {mask_format!r} is not one of {MASK_FORMATS}")
    shape = (len(rows), pad_to)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    source_index = np.full(shape, -1, dtype=np.int64)
    segment_ids = np.zeros(shape, dtype=np.int64)
    sample_ids: list[list[tuple[int, int]]] = []
    for r, row in enumerate(rows):
        cursor = 0
        for segment, sample in enumerate(row):
            n = len(sample.input_ids)
            if cursor + n > pad_to:
                raise ValueError(f"collate: row {r} needs {cursor + n} tokens but rows hold {pad_to}")
            span = slice(cursor, cursor + n)
            input_ids[r, span] = sample.input_ids
            labels[r, span] = sample_labels(sample.labels)
            position_ids[r, span] = np.arange(n)
            source_index[r, span] = sample.source
            segment_ids[r, span] = segment
            cursor += n
        # padding: its own segment, positions continuing from 0, so its rows are never all-masked
        position_ids[r, cursor:] = np.arange(pad_to - cursor)
        segment_ids[r, cursor:] = len(row)
        sample_ids.append([(s.source, s.index) for s in row])
    return MicroBatch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(position_ids),
        source_index=torch.from_numpy(source_index),
        attention_mask=_attention_mask(torch.from_numpy(segment_ids), mask_format),
        sample_ids=sample_ids,
    )


def collate_padding_free(rows: Sequence[Sequence[LoadedSample]], pad_id: int, pad_multiple: int = 1) -> MicroBatch:
    """All samples of `rows` end to end in one row (padded only up to a multiple of `pad_multiple`),
    no attention mask: the attention keeps samples apart from the restarting position ids."""
    samples = [s for row in rows for s in row]
    total = sum(len(s.input_ids) for s in samples)
    return collate_rows([samples], -(-total // pad_multiple) * pad_multiple, pad_id, "none")


def filler_batch(pad_id: int, mask_format: str = "bool") -> MicroBatch:
    """One row of one padding token and no target: a forward that adds (0, 0) to the loss sums
    (a rank whose share is used up runs these so that every rank runs the same forwards)."""
    sample = LoadedSample(0, 0, np.array([pad_id], dtype=np.int64), np.array([IGNORE_INDEX], dtype=np.int64))
    return collate_rows([[sample]], 1, pad_id, mask_format)


def _attention_mask(segment_ids: torch.Tensor, mask_format: str) -> Optional[torch.Tensor]:
    if mask_format == "none":
        return None
    allowed = block_diagonal_causal_mask(segment_ids)
    if mask_format == "bool":
        return allowed
    additive = torch.zeros(allowed.shape, dtype=torch.float32)
    return additive.masked_fill_(~allowed, torch.finfo(torch.float32).min)
