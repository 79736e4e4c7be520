"""Raw record readers: JSON arrays, JSONL, Parquet and text lines, local or any fsspec URL,
optionally gzip/zstd compressed, from a file, a folder or a glob.

Why not `datasets.load_dataset`: it loses line numbers, and errors must name file and line.
These readers keep them: a JSONL record's line is its line; a JSON-array element's line is the
line where the element starts; a Parquet row's "line" is its 1-based row number; a .txt
document's line is its line.

JSONL lines are handed on undecoded (`RawRecord.payload` is bytes) so that decoding and JSON
parsing happen in prepare's worker processes, not in the single reading process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import fsspec
from fsspec.core import url_to_fs
from fsspec.utils import infer_compression

from data_pipeline.errors import DataError, MalformedInputError

DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".txt", ".text")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd")
_GLOB_CHARS = "*?["


@dataclass
class RawRecord:
    """One record as read, before format parsing. `payload` is bytes (an undecoded JSONL line),
    str (a text line) or an already parsed JSON value; `error` is set instead for unreadable input."""

    file: str
    line: int
    payload: Any = None
    error: Optional[DataError] = None


def _strip_compression(path: str) -> str:
    for suffix in COMPRESSION_SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def file_kind(path: str) -> str:
    """json, jsonl, parquet or text, from the name (compression suffix ignored)."""
    base = _strip_compression(path).lower()
    if base.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if base.endswith(".json"):
        return "json"
    if base.endswith(".parquet"):
        return "parquet"
    if base.endswith((".txt", ".text")):
        return "text"
    raise DataError(f"unsupported file type; expected one of {DATA_SUFFIXES} (optionally + .gz/.zst)",
                    file=path, reason="unsupported_file")


def list_files(path: str) -> list[str]:
    """Expand a file, folder (recursively) or glob into sorted fsspec URLs of data files."""
    fs, root = url_to_fs(path)
    if any(c in root for c in _GLOB_CHARS):
        found = fs.glob(root)
    elif fs.isdir(root):
        found = [p for p in fs.find(root) if _strip_compression(p).lower().endswith(DATA_SUFFIXES)]
    elif fs.exists(root):
        found = [root]
    else:
        raise DataError("no such file or folder", file=path, reason="missing_input")
    files = sorted(fs.unstrip_protocol(p) if "://" in path else p for p in found if not fs.isdir(p))
    if not files:
        raise DataError("no data files found (looked for " + ", ".join(DATA_SUFFIXES) + ")", file=path,
                        reason="missing_input")
    return files


def input_checksum(files: list[str]) -> str:
    """Fingerprint of the inputs. Fast path: local files and stores that report an mtime/ETag are
    fingerprinted by (name, size, mtime/ETag) without reading them; stores that report neither
    (e.g. memory://) are hashed by content. Consequence: an in-place edit that keeps size and
    mtime is not noticed (touch the file, or delete the prepared folder, to force a rebuild)."""
    digest = hashlib.sha256()
    for url in files:
        fs, p = url_to_fs(url)
        info = fs.info(p)
        stamp = next((info[k] for k in ("mtime", "LastModified", "last_modified", "ETag", "etag") if k in info), None)
        digest.update(f"{url}\0{info.get('size')}\0".encode())
        if stamp is not None:
            digest.update(str(stamp).encode())
        else:
            with fs.open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb", compression=infer_compression(url)) as f:
        return f.read()


def _line_of(data: bytes, byte_offset: int) -> int:
    return data.count(b"\n", 0, byte_offset) + 1


def _iter_jsonl(url: str, data: bytes) -> Iterator[RawRecord]:
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            yield RawRecord(url, number, line)


def _iter_json_array(url: str, data: bytes) -> Iterator[RawRecord]:
    """Decode element by element so that each record knows its starting line. After a syntax
    error the rest of the array cannot be resynchronised reliably: the error is reported once
    (with its line) and the remainder of that file is not read."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield RawRecord(url, _line_of(data, e.start), error=MalformedInputError(
            f"invalid UTF-8 at byte {e.start}; the file is not read", file=url, line=_line_of(data, e.start),
            reason="invalid_utf8"))
        return
    decoder = json.JSONDecoder()
    pos, line = _skip_ws(text, 0), 1
    line += text.count("\n", 0, pos)
    if not text.startswith("[", pos):
        # A .json file that holds one object per line is JSONL in disguise.
        yield from _iter_jsonl(url, data)
        return
    pos += 1
    index = 0
    while True:
        start = _skip_ws(text, pos)
        line += text.count("\n", pos, start)
        if text.startswith("]", start):
            return
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as e:
            err_line = text.count("\n", 0, e.pos) + 1
            yield RawRecord(url, err_line, error=MalformedInputError(
                f"invalid JSON in array element {index}: {e.msg} (column {e.colno}); the rest of the file is not read",
                file=url, line=err_line, field=f"[{index}]", reason="malformed_json"))
            return
        yield RawRecord(url, line, value)
        line += text.count("\n", start, end)
        pos = _skip_ws(text, end)
        line += text.count("\n", end, pos)
        index += 1
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            err_line = line
            yield RawRecord(url, err_line, error=MalformedInputError(
                f"expected ',' or ']' after array element {index - 1}; the rest of the file is not read",
                file=url, line=err_line, field=f"[{index}]", reason="malformed_json"))
            return


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _iter_text_lines(url: str, data: bytes) -> Iterator[RawRecord]:
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            try:
                yield RawRecord(url, number, line.decode("utf-8").rstrip("\r"))
            except UnicodeDecodeError as e:
                yield RawRecord(url, number, error=MalformedInputError(
                    f"invalid UTF-8 at column {e.start + 1}", file=url, line=number, reason="invalid_utf8"))


def _iter_parquet(url: str) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    row = 0
    try:
        with fsspec.open(url, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
                for record in batch.to_pylist():
                    row += 1
                    yield RawRecord(url, row, record)
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on corrupt files
        yield RawRecord(url, row + 1, error=MalformedInputError(f"unreadable Parquet: {e}", file=url, line=row + 1,
                                                                reason="malformed_parquet"))


def iter_records(files: list[str]) -> Iterator[RawRecord]:
    """All raw records of the files, in order."""
    for url in files:
        kind = file_kind(url)
        if kind == "parquet":
            yield from _iter_parquet(url)
            continue
        data = _read_bytes(url)
        if kind == "jsonl":
            yield from _iter_jsonl(url, data)
        elif kind == "json":
            yield from _iter_json_array(url, data)
        else:
            yield from _iter_text_lines(url, data)


def decode_payload(record: RawRecord) -> Any:
    """The JSON value (or text line) of a record; raises MalformedInputError naming file and line."""
    if record.error is not None:
        raise record.error
    if not isinstance(record.payload, bytes):
        return record.payload
    try:
        text = record.payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedInputError(f"invalid UTF-8 at column {e.start + 1}", file=record.file, line=record.line,
                                  reason="invalid_utf8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MalformedInputError(f"invalid JSON: {e.msg} (column {e.colno})", file=record.file, line=record.line,
                                  reason="malformed_json") from None
