"""Raw record readers: JSON arrays, JSONL, Parquet and text lines, local or any fsspec URL,
optionally gzip/zstd compressed, from a file, a folder or a glob.

Why not `datasets.load_dataset`: it loses line numbers, and errors must name file and line.
These readers keep them: a JSONL record's line is its line; a JSON-array element's line is the
line where the element starts, and its index in the array is kept too (a one-line array puts
every element on line 1); a Parquet row's "line" is its 1-based row number; a .txt document's
line is its line.

Real users' files: a UTF-8 byte order mark is dropped (never trained as text); a JSON array
saved under a .jsonl name is read as the array it is; one bad byte or one broken element of an
array is one bad record, and reading resumes at the next element. What cannot be read or
counted is an error naming the file, in every on_error mode: a corrupt or truncated .gz/.zst, an
array that cannot be resumed, a UTF-16 file, a file without a single record.

JSONL lines are handed on undecoded (`RawRecord.payload` is bytes) so that decoding and JSON
parsing happen in prepare's worker processes, not in the single reading process.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional


from data_pipeline.errors import DataError, MalformedInputError, SourceRejected

DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".txt", ".text")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd")
_GLOB_CHARS = "*?["
UTF8_BOM = b"\xef\xbb\xbf"
_BAD_BYTE = re.compile("[\udc80-\udcff]")
"""A byte that is not UTF-8, as decoded with errors="surrogateescape"."""
_ELEMENT_START = re.compile(r",\s*[\[{]")


@dataclass
class RawRecord:
    """One record as read, before format parsing. `payload` is bytes (an undecoded JSONL line),
    str (a text line) or an already parsed JSON value; `error` is set instead for unreadable input."""

    file: str
    line: int
    payload: Any = None
    error: Optional[DataError] = None
    index: Optional[int] = None
    """0-based position inside a JSON array (None for JSONL lines, text lines, Parquet rows)."""


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
    from fsspec.core import url_to_fs  # imported here: prepare's workers need none of fsspec

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
    from fsspec.core import url_to_fs

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


def _decompress_zstd(raw: bytes, url: str) -> bytes:
    """All frames of a zstd file; a truncated last frame is an error (a streaming reader returns
    what it has decoded so far and says nothing)."""
    import zstandard  # optional dependency, only for .zst inputs

    parts = []
    while raw:
        decoder = zstandard.ZstdDecompressor().decompressobj()
        parts.append(decoder.decompress(raw))
        if not decoder.eof:
            raise MalformedInputError("truncated zstd data (the file ends inside a frame); the file is not read",
                                      file=url, reason="unreadable_file")
        raw = decoder.unused_data
    return b"".join(parts)


def _read_bytes(url: str) -> bytes:
    """The file's bytes, decompressed (.gz, .zst), without a UTF-8 byte order mark. A corrupt or
    truncated compressed file is an error naming the file, in every on_error mode: its records
    cannot even be counted."""
    import fsspec
    from fsspec.utils import infer_compression

    with fsspec.open(url, "rb") as f:
        raw = f.read()
    compression = infer_compression(url)
    try:
        if compression == "gzip":
            raw = gzip.decompress(raw)
        elif compression == "zstd":
            raw = _decompress_zstd(raw, url)
        elif compression is not None:
            with fsspec.open(url, "rb", compression=compression) as f:
                raw = f.read()
    except MalformedInputError:
        raise
    except Exception as e:  # gzip: BadGzipFile/EOFError, zstd: ZstdError, others: their own types
        raise MalformedInputError(f"cannot decompress the file ({compression}): {e}; the file is not read",
                                  file=url, reason="unreadable_file") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise MalformedInputError("the file is UTF-16 encoded (it starts with a UTF-16 byte order mark); "
                                  "save it as UTF-8", file=url, line=1, reason="invalid_utf8")
    return raw[len(UTF8_BOM):] if raw.startswith(UTF8_BOM) else raw


def _iter_jsonl(url: str, data: bytes) -> Iterator[RawRecord]:
    if re.match(rb"\s*\[\s*[{\]]", data[:4096]):
        # A JSON array of records saved under a .jsonl name (one line or pretty-printed) is read as
        # the array it is. (A line that is itself an array is left to fail as the bad record it is.)
        yield from _iter_json_array(url, data)
        return
    yield from _iter_jsonl_lines(url, data)


class _ArrayText:
    """A JSON array's text and where its elements start, for reading it element by element.

    Bytes that are not UTF-8 are kept as lone surrogates (surrogateescape) so that one bad byte
    spoils only the element that holds it, not the whole file."""

    def __init__(self, url: str, data: bytes) -> None:
        self.url = url
        self.text = data.decode("utf-8", errors="surrogateescape")
        self.bad_bytes = [m.start() for m in _BAD_BYTE.finditer(self.text)]
        self._cursor = (0, 1)
        """(position, its line): lines are counted from the last position asked about."""
        self.decoder = json.JSONDecoder()
        self.separator = ""
        """The whitespace before the first element: between elements it is the same in any
        consistently formatted array (e.g. newline + two spaces)."""
        self.signature = ""
        """How the first element begins (e.g. '{"instruction":'), to find element starts in a
        one-line array."""

    def line(self, pos: int) -> int:
        """1-based line of character `pos`. Reading asks about positions in nearly increasing order,
        so counting from the previous one keeps a whole file linear (counting from the start each
        time would be quadratic; a table of newline positions would cost memory per line)."""
        last, line = self._cursor
        if pos >= last:
            line += self.text.count("\n", last, pos)
        else:
            line -= self.text.count("\n", pos, last)
        self._cursor = (pos, line)
        return line

    def bad_byte_in(self, start: int, end: int) -> Optional[int]:
        i = bisect.bisect_left(self.bad_bytes, start)
        return self.bad_bytes[i] if i < len(self.bad_bytes) and self.bad_bytes[i] < end else None

    def learn_layout(self, open_pos: int, first: int) -> None:
        self.separator = self.text[open_pos + 1:first]
        head = self.text[first:first + 80]
        colon = head.find(":")
        self.signature = head[:colon + 1] if head.startswith("{") and colon > 0 else head[:1]

    def resync(self, after: int) -> Optional[int]:
        """Start of the next element after a broken one, or None. A candidate is a comma followed
        by the array's own separator (multi-line arrays: the same indentation) or by the first
        element's opening (one-line arrays), from which one whole value decodes."""
        if "\n" in self.separator:
            indent = self.separator[self.separator.rindex("\n") + 1:]
            pattern = re.compile(r",[ \t\r]*\n" + re.escape(indent) + r"(?=[^\s])")
        else:
            pattern = re.compile(r",\s*(?=" + re.escape(self.signature or "{") + ")")
        for tries, match in enumerate(pattern.finditer(self.text, after)):
            if tries >= 100:
                return None
            try:
                _, end = self.decoder.raw_decode(self.text, match.end())
            except (json.JSONDecodeError, RecursionError):
                continue
            if self.text.startswith((",", "]"), _skip_ws(self.text, end)):
                return match.end()
        return None

    def is_last_element(self, start: int) -> bool:
        """Whether the broken element at `start` is plausibly the array's last: the text ends with
        ']' and nothing between looks like the start of another element. When in doubt the file is
        an error, not a silently half-read file."""
        stripped = self.text.rstrip()
        if not stripped.endswith("]"):
            return False
        return _ELEMENT_START.search(self.text, start + 1, len(stripped) - 1) is None


def _iter_json_array(url: str, data: bytes) -> Iterator[RawRecord]:
    """Decode element by element so that each record knows its starting line and its index.
    A broken element (bad JSON, a byte that is not UTF-8, nesting too deep) is one bad record;
    reading resumes at the next element when the array's layout shows where it starts. When it
    does not (a truncated file), the file is an error in every on_error mode: the records after
    that point cannot even be counted."""
    array = _ArrayText(url, data)
    text = array.text
    open_pos = _skip_ws(text, 0)
    if not text.startswith("[", open_pos):
        # A .json file that holds one object per line is JSONL in disguise.
        yield from _iter_jsonl_lines(url, data)
        return
    pos = open_pos + 1
    index = 0
    while True:
        start = _skip_ws(text, pos)
        if index == 0:
            array.learn_layout(open_pos, start)
        if text.startswith("]", start):
            _check_array_end(array, start + 1)
            return
        line = array.line(start)
        value, end, problem = _decode_element(array, start, index)
        if problem is None:
            bad = array.bad_byte_in(start, end)
            if bad is None:
                yield RawRecord(url, line, value, index=index)
            else:
                yield RawRecord(url, line, index=index, error=MalformedInputError(
                    f"invalid UTF-8 byte 0x{ord(text[bad]) - 0xDC00:02x} at line {array.line(bad)} inside array "
                    f"element {index}", file=url, line=array.line(bad), index=index, reason="invalid_utf8"))
            pos = _skip_ws(text, end)
            if text.startswith(",", pos):
                pos += 1
                index += 1
                continue
            if text.startswith("]", pos):
                _check_array_end(array, pos + 1)
                return
            problem = MalformedInputError(f"expected ',' or ']' after array element {index}", file=url,
                                          line=array.line(pos), index=index, reason="malformed_json")
            index += 1
        resume = array.resync(start + 1)
        if resume is None and not array.is_last_element(start):
            raise MalformedInputError(f"{problem.message}; the array cannot be read past this point (no later "
                                      "element start found: a truncated file, or a broken layout); fix the file",
                                      file=url, line=problem.line, index=problem.index, reason=problem.reason)
        until = f"resumed at line {array.line(resume)}" if resume is not None else "it was the last element"
        yield RawRecord(url, problem.line, index=problem.index, error=MalformedInputError(
            f"{problem.message} ({until})", file=url, line=problem.line, index=problem.index, reason=problem.reason))
        if resume is None:
            return
        pos = resume
        index = (problem.index or 0) + 1


def _decode_element(array: _ArrayText, start: int, index: int
                    ) -> tuple[Any, int, Optional[MalformedInputError]]:
    """(value, end, None) when one JSON value decodes at `start`, else (None, start, the error)."""
    try:
        value, end = array.decoder.raw_decode(array.text, start)
        return value, end, None
    except RecursionError:
        message, line = f"array element {index} is nested too deeply", array.line(start)
        reason = "too_deep"
    except json.JSONDecodeError as e:
        bad = array.bad_byte_in(start, e.pos + 1)
        line = array.line(bad if bad is not None else e.pos)
        reason = "invalid_utf8" if bad is not None else "malformed_json"
        message = (f"invalid UTF-8 byte in array element {index}" if bad is not None
                   else f"invalid JSON in array element {index}: {e.msg} (column {e.colno})")
    return None, start, MalformedInputError(message, file=array.url, line=line, index=index, reason=reason)


def _check_array_end(array: _ArrayText, after: int) -> None:
    rest = _skip_ws(array.text, after)
    if rest < len(array.text):
        raise MalformedInputError("unexpected text after the end of the JSON array (two arrays in one file?)",
                                  file=array.url, line=array.line(rest), reason="malformed_json")


def _iter_jsonl_lines(url: str, data: bytes) -> Iterator[RawRecord]:
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            yield RawRecord(url, number, line)


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _iter_text_lines(url: str, data: bytes) -> Iterator[RawRecord]:
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            try:
                yield RawRecord(url, number, line.decode("utf-8").rstrip("\r").removeprefix("\ufeff"))
            except UnicodeDecodeError as e:
                yield RawRecord(url, number, error=MalformedInputError(
                    f"invalid UTF-8 at column {e.start + 1}", file=url, line=number, reason="invalid_utf8"))


def _iter_parquet(url: str) -> Iterator[RawRecord]:
    import fsspec
    import pyarrow.parquet as pq

    row = 0
    try:
        with fsspec.open(url, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
                for record in batch.to_pylist():
                    row += 1
                    yield RawRecord(url, row, record)
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on corrupt files
        raise MalformedInputError(f"unreadable Parquet (row {row + 1} on cannot be read): {e}", file=url,
                                  line=row + 1, reason="malformed_parquet") from None


def _iter_file(url: str) -> Iterator[RawRecord]:
    kind = file_kind(url)
    if kind == "parquet":
        yield from _iter_parquet(url)
        return
    data = _read_bytes(url)
    if kind == "jsonl":
        yield from _iter_jsonl(url, data)
    elif kind == "json":
        yield from _iter_json_array(url, data)
    else:
        yield from _iter_text_lines(url, data)


def iter_records(files: list[str]) -> Iterator[RawRecord]:
    """All raw records of the files, in order. A file without a single record is an error (an
    empty export, a wrong glob), whatever the format and error policy: it would train on nothing."""
    for url in files:
        count = 0
        for record in _iter_file(url):
            count += 1
            yield record
        if count == 0:
            raise SourceRejected("the file holds no records (it is empty or blank)", file=url, reason="empty_file")


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
        return json.loads(text.removeprefix("\ufeff"))  # a BOM inside a concatenation of files
    except json.JSONDecodeError as e:
        raise MalformedInputError(f"invalid JSON: {e.msg} (column {e.colno})", file=record.file, line=record.line,
                                  reason="malformed_json") from None
    except RecursionError:
        raise MalformedInputError("the record is nested too deeply", file=record.file, line=record.line,
                                  reason="too_deep") from None
