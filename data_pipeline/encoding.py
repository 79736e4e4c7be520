"""Rendered samples -> token ids + per-token loss mask, with the declared truncation policy.

The whole rendered text of a sample is tokenized once (with offsets), so BPE merges across
template/response boundaries happen exactly as they will at inference time; a character span is
then mapped to tokens by offsets.

Boundary rule: a token trains iff its character range overlaps a trained span. A token that
straddles a boundary (e.g. a whitespace run that starts in the template and ends in the
response) therefore trains: no response character is ever left without a trained token, at the
price of occasionally training a template character merged into it. Built-in templates end every
prompt piece with a newline or a special token, which byte-level pre-tokenizers never merge with
the next character except inside a whitespace run.

Truncation (seq_len): `drop` rejects an over-long sample; `truncate_prompt` keeps the last
seq_len tokens ending at the last trained token, so the earliest turns go first, then the head of
the last prompt; if the final response alone does not fit the sample is rejected
(response_too_long). A sample with no trained token is always rejected (no_trained_tokens).
Text documents (continued pretraining) train on every token plus a closing eos and are split into
consecutive seq_len chunks instead of truncated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from data_pipeline.errors import SampleRejected
from data_pipeline.templates import Rendered


@dataclass(frozen=True)
class EncodeSettings:
    seq_len: int
    train_on: str = "all_assistant"
    truncation: str = "truncate_prompt"
    eos_token: str = ""


@dataclass
class EncodedSample:
    input_ids: np.ndarray
    """Token ids, int64 [n]."""
    trained: np.ndarray
    """bool [n]: True where the token is a training target (labels == input_ids)."""
    truncated: bool = False


def spans_to_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """bool [n]: token t overlaps some span [start, end) (offsets is int [n, 2] of char ranges)."""
    mask = np.zeros(len(offsets), dtype=bool)
    if len(offsets) == 0:
        return mask
    starts, ends = offsets[:, 0], offsets[:, 1]
    for s, e in spans:
        mask |= (starts < e) & (ends > s)
    return mask


def select_spans(rendered: Rendered, train_on: str) -> list[tuple[int, int]]:
    if train_on == "everything":
        return [(0, len(rendered.text))]
    if train_on == "last_assistant":
        return rendered.assistant_spans[-1:]
    return list(rendered.assistant_spans)


def truncate(sample: EncodedSample, last_span_tokens: int, settings: EncodeSettings) -> EncodedSample:
    n = len(sample.input_ids)
    if n <= settings.seq_len:
        return sample
    if settings.truncation == "drop":
        raise SampleRejected(f"{n} tokens > seq_len {settings.seq_len} (truncation=drop)", reason="too_long")
    if last_span_tokens > settings.seq_len:
        raise SampleRejected(f"the final response alone has {last_span_tokens} tokens > seq_len {settings.seq_len}",
                             reason="response_too_long")
    trained_positions = np.flatnonzero(sample.trained)
    end = int(trained_positions[-1]) + 1
    start = max(0, end - settings.seq_len)
    return EncodedSample(sample.input_ids[start:end], sample.trained[start:end], truncated=True)


def _last_span_token_count(offsets: np.ndarray, span: tuple[int, int]) -> int:
    return int(spans_to_mask(offsets, [span]).sum())


def encode_conversation(rendered: Rendered, ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                        settings: EncodeSettings) -> EncodedSample:
    ids_arr = np.asarray(ids, dtype=np.int64)
    off_arr = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    spans = select_spans(rendered, settings.train_on)
    trained = spans_to_mask(off_arr, spans)
    if not trained.any():
        raise SampleRejected("no token is trained (empty response after templating)", reason="no_trained_tokens")
    last = _last_span_token_count(off_arr, rendered.assistant_spans[-1]) if rendered.assistant_spans else 0
    return truncate(EncodedSample(ids_arr, trained), last, settings)


def encode_document(ids: Sequence[int], eos_id: Optional[int], seq_len: int) -> list[EncodedSample]:
    ids_arr = np.asarray(list(ids) + ([eos_id] if eos_id is not None else []), dtype=np.int64)
    return [EncodedSample(ids_arr[i:i + seq_len], np.ones(len(ids_arr[i:i + seq_len]), dtype=bool))
            for i in range(0, len(ids_arr), seq_len)]
