"""The per-chunk work of `prepare`, run in worker processes: raw records -> one shard.

A chunk is decoded, parsed and rendered record by record, tokenized in one batch call of the
Rust tokenizer (offsets included), masked, truncated and written as one shard. Workers hold a
bare `tokenizers.Tokenizer` rebuilt from its JSON (cheap to ship, no transformers object to
pickle) and the template rebuilt (and compiled) once from its TemplateSpec.

Byte-level BPE tokenizers that render/fast_bpe.py proves equivalent are encoded with its fast
encoder instead (same ids, same offsets); the HF tokenizer is then built only if a text needs it.

Special-token text inside the data is plain text (special_text.py): documents are encoded with
special-token matching off; the rare conversation whose data spells a special token is encoded
piecewise around the template's own special tokens; all others go through the batch call.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from data_pipeline.render.encoding import EncodedSample, EncodeSettings, encode_conversation, encode_document
from data_pipeline.errors import DataError, MalformedInputError, SampleExcluded, SkipExample
from data_pipeline.store.fingerprint import sample_fingerprint
from data_pipeline.ingest.formats import Conversation, TextDocument, parse_record
from data_pipeline.ingest.readers import RawRecord, decode_payload
from data_pipeline.store.shards import ShardWriter
from data_pipeline.render.fast_bpe import FastBPE, FastBPEPlan, NotCovered, PlainAdapter
from data_pipeline.render.special_text import GuardedTemplate, encode_guarded, special_token_ids
from data_pipeline.render.reasoning import render_samples
from data_pipeline.render.templates import ChatTemplate, Rendered, TemplateSpec, build_template

EXAMPLES_PER_REASON = 3
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
"""JSON may spell a lone UTF-16 surrogate ("\\ud800"): valid JSON, but no Unicode text, and the
tokenizer cannot take it."""


def _surrogate_field(value: Any, path: str = "") -> Optional[str]:
    """Path of the first string (or key) inside a decoded record that holds a lone surrogate."""
    if isinstance(value, str):
        return (path or "<record>") if _LONE_SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))
        if isinstance(key, str) and _LONE_SURROGATE.search(key):
            return where
        found = _surrogate_field(item, where)
        if found:
            return found
    return None


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
    fast_bpe: Optional[FastBPEPlan] = None
    """Set when the tokenizer is eligible for the fast encoder (fast_bpe.fast_bpe_plan)."""


ChunkTask = tuple[str, int, list[RawRecord]]
"""(source name, shard id, records): one unit of work for the pool."""


@dataclass
class ChunkResult:
    source: str
    shard_id: int
    records: int
    tokens: int = 0
    response_tokens: int = 0
    truncated: int = 0
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    fingerprints: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    """One per sample, in shard order (fingerprint.py)."""
    skips: Counter = field(default_factory=Counter)
    excluded: int = 0
    """How many of the skipped records were left out by a declared rule (SampleExcluded), not as bad."""
    examples: list[SkipExample] = field(default_factory=list)
    files: dict[str, dict] = field(default_factory=dict)
    """{file name: {size, sha256}} of the shard's files (for the manifest)."""
    template_counts: Counter = field(default_factory=Counter)
    """Counted outcomes of rendering and truncation of the kept samples: reasoning turns rendered
    or dropped by the template, samples split per turn, truncations by kind."""

    @property
    def samples(self) -> int:
        return len(self.lengths)


class ChunkTokenizer:
    """Turns chunks of raw records into shards; one instance per worker process."""

    def __init__(self, job: ChunkJob, job_name: str = "") -> None:
        self.job = job
        self.job_name = job_name
        self.fast = FastBPE(job.fast_bpe) if job.fast_bpe is not None else None
        self._hf: dict[bool, object] = {}
        self.template: ChatTemplate = build_template(job.template)
        guarded = isinstance(self.template, GuardedTemplate)
        self.guard = self.template.guard if guarded else None
        self.special_ids = special_token_ids(self._vocab(), self.guard.special_texts) if guarded else {}

    def _vocab(self):
        """Something with token_to_id: the fast encoder's added tokens when they hold every id asked
        for, else the HF tokenizer."""
        if self.fast is not None and self.guard is not None and all(t in self.fast.added_ids
                                                                     for t in self.guard.special_texts):
            return self.fast
        return self.tokenizer

    def _hf_tokenizer(self, plain: bool):
        if plain not in self._hf:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(self.job.tokenizer_json)
            tokenizer.encode_special_tokens = plain  # plain: every special-token string is split as text
            self._hf[plain] = tokenizer
        return self._hf[plain]

    @property
    def tokenizer(self):
        return self._hf_tokenizer(False)

    @property
    def plain_tokenizer(self):
        return self._hf_tokenizer(True)

    def _skip(self, result: ChunkResult, err: DataError, record: RawRecord) -> None:
        if not err.file:
            err = err.located(record.file, record.line, record.index)
        if self.job.strict and not isinstance(err, SampleExcluded):
            raise err
        result.skips[err.reason] += 1
        result.excluded += isinstance(err, SampleExcluded)
        if result.skips[err.reason] <= EXAMPLES_PER_REASON:
            result.examples.append(SkipExample.from_error(err))

    def _parse(self, record: RawRecord) -> tuple[Union[Conversation, TextDocument], list[Optional[Rendered]]]:
        """The parsed record and the samples it renders to (one, or one per assistant turn under
        data.reasoning_turns=every_turn; [None] for a document)."""
        payload = decode_payload(record)
        try:
            sample = parse_record(payload, self.job.fmt, self.job.text_field)
            if isinstance(sample, Conversation):
                renders: list[Optional[Rendered]] = render_samples(self.template, sample,
                                                                   self.job.template.reasoning_turns)
            else:
                renders = [None]
        except RecursionError:  # e.g. JSON text inside a field (tool calls, tools) nested thousands deep
            raise MalformedInputError("the record is nested too deeply to parse or render", field="<record>",
                                      reason="too_deep") from None
        if any(_LONE_SURROGATE.search(sample.text if r is None else r.text) for r in renders):
            raise MalformedInputError("invalid Unicode: a lone surrogate (e.g. \\ud800 in the JSON) is not text",
                                      field=_surrogate_field(payload) or "<record>", reason="invalid_unicode")
        return sample, renders

    def _encode(self, rendered: Optional[Rendered], ids, offsets) -> list[EncodedSample]:
        if rendered is None:
            return encode_document(ids, self.job.eos_id, self.job.settings.seq_len)
        return [encode_conversation(rendered, ids, offsets, self.job.settings)]

    def _tokenize(self, parsed: list[tuple[RawRecord, object, Optional[Rendered]]]) -> list[tuple[list, list]]:
        """(ids, offsets) per parsed sample, in order. Rendered conversations go through one batch
        call (template special tokens recognised), documents through another (special-token text
        split as plain text); a conversation whose data spells a special token is encoded alone."""
        out: list = [None] * len(parsed)
        conversations, documents = [], []
        for i, (_, sample, rendered) in enumerate(parsed):
            if rendered is None:
                documents.append((i, sample.text))
            elif rendered.literal_spans:
                out[i] = self._encode_guarded(rendered)
            else:
                conversations.append((i, rendered.text))
        for batch, plain in ((conversations, False), (documents, True)):
            if batch:
                for (i, _), (ids, offsets) in zip(batch, self._encode_batch([text for _, text in batch], plain)):
                    out[i] = (ids, () if plain else offsets)  # documents need no offsets
        return out

    def _encode_batch(self, texts: list[str], plain: bool) -> list:
        if self.fast is not None:
            try:
                return self.fast.encode_batch(texts, match_special=not plain)
            except NotCovered:  # a pre-tokenizer pattern that skips characters: those texts go to HF
                return [self._encode_one(text, plain) for text in texts]
        encodings = self._hf_tokenizer(plain).encode_batch(texts, add_special_tokens=False)
        return [(enc.ids, enc.offsets) for enc in encodings]

    def _encode_one(self, text: str, plain: bool):
        try:
            return self.fast.encode(text, match_special=not plain)
        except NotCovered:
            enc = self._hf_tokenizer(plain).encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets

    def _encode_guarded(self, rendered: Rendered):
        if self.fast is not None:
            try:
                return encode_guarded(PlainAdapter(self.fast), rendered.text, rendered.literal_spans, self.guard,
                                      self.special_ids)
            except NotCovered:
                pass
        return encode_guarded(self.plain_tokenizer, rendered.text, rendered.literal_spans, self.guard,
                              self.special_ids)

    def run(self, shard_id: int, records: list[RawRecord]) -> ChunkResult:
        result = ChunkResult(self.job_name, shard_id, len(records))
        parsed: list[tuple[RawRecord, object, Optional[Rendered]]] = []
        pending: Optional[tuple[DataError, RawRecord]] = None
        for record in records:
            try:
                sample, renders = self._parse(record)
                parsed.extend((record, sample, rendered) for rendered in renders)
            except DataError as err:
                if self.job.strict and not isinstance(err, SampleExcluded):
                    pending = (err, record)  # earlier records must still be checked first
                    break
                self._skip(result, err, record)
        writer = ShardWriter(Path(self.job.folder), shard_id, np.dtype(self.job.token_dtype))
        fingerprints: list[int] = []
        for (record, sample, rendered), (ids, offsets) in zip(parsed, self._tokenize(parsed)):
            try:
                encoded = self._encode(rendered, ids, offsets)
            except DataError as err:
                self._skip(result, err, record)
                continue
            for e in encoded:
                writer.add(e.input_ids, e.trained)
                fingerprints.append(sample_fingerprint(e.input_ids, e.trained))
                result.response_tokens += int(e.trained.sum())
                result.truncated += int(e.truncated)
                if e.truncation:
                    result.template_counts[f"truncated_{e.truncation}"] += 1
            if rendered is not None:
                result.template_counts.update(rendered.counts)
        if pending is not None:
            self._skip(result, *pending)
        result.lengths = writer.lengths()
        result.fingerprints = np.array(fingerprints, dtype=np.uint64)
        result.tokens = writer.close()
        result.files = writer.files
        return result


_JOBS: dict[str, ChunkJob] = {}
_WORKERS: dict[str, ChunkTokenizer] = {}


def init_worker(jobs: dict[str, ChunkJob]) -> None:
    """Pool initializer: the jobs of all sources; each worker builds a source's tokenizer and
    template once, on its first chunk of that source."""
    _JOBS.clear()
    _JOBS.update(jobs)
    _WORKERS.clear()


def run_chunk(task: ChunkTask) -> ChunkResult:
    name, shard_id, records = task
    if name not in _JOBS:
        raise RuntimeError(f"init_worker was not called with a job for source {name!r} in this process")
    if name not in _WORKERS:
        _WORKERS[name] = ChunkTokenizer(_JOBS[name], name)
    return _WORKERS[name].run(shard_id, records)
