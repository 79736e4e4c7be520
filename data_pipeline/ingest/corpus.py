"""Plain text of the run's sources, for training a tokenizer on them.

Bad records are passed over here: `prepare` reads the same files with the configured error policy
and reports every skip; a tokenizer only needs a representative sample of the good text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from data_pipeline.ingest.demo_data import BUILTIN_PREFIX, materialize_builtin
from data_pipeline.errors import DataError
from data_pipeline.ingest.formats import Conversation, detect_format, parse_record
from data_pipeline.ingest.readers import decode_payload, iter_records, list_files
from data_pipeline.spec import SourceSpec


def resolve_path(spec: SourceSpec, cache_dir: str | Path) -> str:
    """The readable path of a source: builtin sets are materialised under cache_dir first."""
    if spec.path.startswith(BUILTIN_PREFIX):
        return materialize_builtin(spec.path, cache_dir)
    return spec.path


def iter_texts(sources: Sequence[SourceSpec], cache_dir: str | Path, max_records: int = 200_000) -> Iterator[str]:
    """Each record's text (system, turns and tool calls joined), up to max_records per source."""
    for spec in sources:
        fmt = spec.format
        files = list_files(resolve_path(spec, cache_dir))
        for i, raw in enumerate(iter_records(files)):
            if i >= max_records:
                break
            try:
                payload = decode_payload(raw)
                if fmt == "auto":
                    fmt = detect_format(payload, spec.text_field)
                sample = parse_record(payload, fmt, spec.text_field)
            except DataError:
                continue
            yield _text_of(sample)


def _text_of(sample) -> str:
    if not isinstance(sample, Conversation):
        return sample.text
    parts = [sample.system or ""]
    for m in sample.messages:
        parts.append(m.content)
        parts.extend(call.as_json_text() for call in m.tool_calls or ())
    return "\n".join(p for p in parts if p)
