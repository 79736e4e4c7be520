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

Truncation (seq_len), at whole messages: an over-long conversation loses whole exchanges (a user
turn and the turns answering it), oldest first, never the system prompt or the tool definitions
before the first exchange, and never starts inside a message. Only when the last exchange alone
does not fit does the declared policy apply: `truncate_prompt` cuts the start of that last user
message's content (its header stays), `whole_turns` rejects the sample (last_exchange_too_long),
and `drop` rejects any over-long sample (too_long). If the final response alone does not fit the
sample is rejected (response_too_long). Each outcome is counted in the manifest. A sample with no
trained token is always rejected (no_trained_tokens).
Text documents (continued pretraining) train on every token plus a closing eos and are split into
consecutive seq_len chunks instead of truncated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from data_pipeline.errors import SampleRejected
from data_pipeline.render.rendering import Rendered


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
    truncation: str = ""
    """How it was truncated: "" (not), "whole_turns" (oldest exchanges dropped) or "prompt_cut"
    (the start of the last user message cut as well)."""


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


def _joined(sample: EncodedSample, pieces: list[tuple[int, int]], how: str) -> EncodedSample:
    ids = np.concatenate([sample.input_ids[a:b] for a, b in pieces])
    trained = np.concatenate([sample.trained[a:b] for a, b in pieces])
    return EncodedSample(ids, trained, truncated=True, truncation=how)


def truncate(sample: EncodedSample, rendered: Rendered, offsets: np.ndarray, settings: EncodeSettings
             ) -> EncodedSample:
    """`sample` cut to seq_len at whole exchanges (see the module docstring)."""
    n, limit = len(sample.input_ids), settings.seq_len
    if n <= limit:
        return sample
    if settings.truncation == "drop":
        raise SampleRejected(f"{n} tokens > seq_len {limit} (truncation=drop)", reason="too_long")
    bounds = rendered.exchange_bounds()
    if not bounds:
        raise SampleRejected(f"{n} tokens > seq_len {limit}, and the template's turns cannot be located to "
                             "truncate at whole messages", reason="truncation_unsupported")
    token_starts = offsets[:, 0]

    def token_at(char: int) -> int:  # first token that starts at or after a character offset
        return int(np.searchsorted(token_starts, char, side="left"))

    prefix = token_at(bounds[0][0])
    exchange = [token_at(start) for start, _ in bounds]
    for first_kept in exchange[1:]:
        if prefix + n - first_kept <= limit:
            return _joined(sample, [(0, prefix), (first_kept, n)], "whole_turns")
    if settings.truncation == "whole_turns":
        raise SampleRejected(f"the last exchange alone has {n - exchange[-1]} tokens (+{prefix} of system prompt) > "
                             f"seq_len {limit} (truncation=whole_turns)", reason="last_exchange_too_long")
    content = token_at(bounds[-1][1])
    head = prefix + content - exchange[-1]  # system prompt + the last user message's header
    trained_after = np.flatnonzero(sample.trained[content:])
    response = n - (content + int(trained_after[0])) if len(trained_after) else 0
    if head + response > limit:
        raise SampleRejected(f"the final response alone has {response} tokens (+{head} of system prompt and header) "
                             f"> seq_len {limit}", reason="response_too_long")
    return _joined(sample, [(0, prefix), (exchange[-1], content), (n - (limit - head), n)], "prompt_cut")


def encode_conversation(rendered: Rendered, ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                        settings: EncodeSettings) -> EncodedSample:
    ids_arr = np.asarray(ids, dtype=np.int64)
    off_arr = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    spans = select_spans(rendered, settings.train_on)
    trained = spans_to_mask(off_arr, spans)
    if not trained.any():
        raise SampleRejected("no token is trained (empty response after templating)", reason="no_trained_tokens")
    return truncate(EncodedSample(ids_arr, trained), rendered, off_arr, settings)


def encode_document(ids: Sequence[int], eos_id: Optional[int], seq_len: int) -> list[EncodedSample]:
    ids_arr = np.asarray(list(ids) + ([eos_id] if eos_id is not None else []), dtype=np.int64)
    return [EncodedSample(ids_arr[i:i + seq_len], np.ones(len(ids_arr[i:i + seq_len]), dtype=bool))
            for i in range(0, len(ids_arr), seq_len)]
