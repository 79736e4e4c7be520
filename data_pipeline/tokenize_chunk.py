"""The per-chunk work of `prepare`, run in worker processes: raw records -> one shard.

A chunk is decoded, parsed and rendered record by record, tokenized in one batch call of the
Rust tokenizer (offsets included), masked, truncated and written as one shard. Workers hold a
bare `tokenizers.Tokenizer` rebuilt from its JSON (cheap to ship, no transformers object to
pickle) and the template rebuilt from its TemplateSpec.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from data_pipeline.encoding import EncodedSample, EncodeSettings, encode_conversation, encode_document
from data_pipeline.errors import DataError, SkipExample
from data_pipeline.formats import Conversation, TextDocument, parse_record
from data_pipeline.readers import RawRecord, decode_payload
from data_pipeline.shards import ShardWriter
from data_pipeline.templates import ChatTemplate, Rendered, TemplateSpec, build_template

EXAMPLES_PER_REASON = 3


@dataclass(frozen=True)
class ChunkJob:
    """What every chunk of one source shares (shipped once per worker)."""

    tokenizer_json: str
    template: TemplateSpec
    settings: EncodeSettings
    fmt: str
    text_field: str
    strict: bool
    folder: str
    token_dtype: str
    eos_id: Optional[int]


@dataclass
class ChunkResult:
    shard_id: int
    records: int
    tokens: int = 0
    response_tokens: int = 0
    truncated: int = 0
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    skips: Counter = field(default_factory=Counter)
    examples: list[SkipExample] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return len(self.lengths)


class ChunkTokenizer:
    """Turns chunks of raw records into shards; one instance per worker process."""

    def __init__(self, job: ChunkJob) -> None:
        from tokenizers import Tokenizer

        self.job = job
        self.tokenizer = Tokenizer.from_str(job.tokenizer_json)
        self.template: ChatTemplate = build_template(job.template)

    def _skip(self, result: ChunkResult, err: DataError, record: RawRecord) -> None:
        if not err.file:
            err = err.located(record.file, record.line)
        if self.job.strict:
            raise err
        result.skips[err.reason] += 1
        if result.skips[err.reason] <= EXAMPLES_PER_REASON:
            result.examples.append(SkipExample.from_error(err))

    def _parse(self, record: RawRecord) -> tuple[Union[Conversation, TextDocument], Optional[Rendered]]:
        sample = parse_record(decode_payload(record), self.job.fmt, self.job.text_field)
        rendered = self.template.render(sample) if isinstance(sample, Conversation) else None
        return sample, rendered

    def _encode(self, sample, rendered: Optional[Rendered], encoding) -> list[EncodedSample]:
        if rendered is None:
            return encode_document(encoding.ids, self.job.eos_id, self.job.settings.seq_len)
        return [encode_conversation(rendered, encoding.ids, encoding.offsets, self.job.settings)]

    def run(self, shard_id: int, records: list[RawRecord]) -> ChunkResult:
        result = ChunkResult(shard_id, len(records))
        parsed: list[tuple[RawRecord, object, Optional[Rendered]]] = []
        pending: Optional[tuple[DataError, RawRecord]] = None
        for record in records:
            try:
                parsed.append((record, *self._parse(record)))
            except DataError as err:
                if self.job.strict:
                    pending = (err, record)  # earlier records must still be checked first
                    break
                self._skip(result, err, record)
        texts = [r.text if r is not None else s.text for _, s, r in parsed]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
        writer = ShardWriter(Path(self.job.folder), shard_id, np.dtype(self.job.token_dtype))
        for (record, sample, rendered), encoding in zip(parsed, encodings):
            try:
                encoded = self._encode(sample, rendered, encoding)
            except DataError as err:
                self._skip(result, err, record)
                continue
            for e in encoded:
                writer.add(e.input_ids, e.trained)
                result.response_tokens += int(e.trained.sum())
                result.truncated += int(e.truncated)
        if pending is not None:
            self._skip(result, *pending)
        result.lengths = writer.lengths()
        result.tokens = writer.close()
        return result


_WORKER: Optional[ChunkTokenizer] = None


def init_worker(job: ChunkJob) -> None:
    global _WORKER
    _WORKER = ChunkTokenizer(job)


def run_chunk(task: tuple[int, list[RawRecord]]) -> ChunkResult:
    if _WORKER is None:
        raise RuntimeError("init_worker was not called in this process")
    return _WORKER.run(*task)
