"""`prepare`: raw sources -> per-source tokenized shards + manifest, on all cores.

    python -m data_pipeline.prepare --source NAME=PATH[:FORMAT] ... --tokenizer DIR --out DIR \
        [--template auto] [--seq-len 1024] [--train-on all_assistant] [--on-error skip] [--num-proc 0]

Guarantees:
  * idempotent: a source whose inputs (see readers.input_checksum), tokenizer fingerprint and
    token-level settings match an existing complete manifest is reused, not re-tokenized;
  * kill-safe: a source is built in `<out>/.tmp-<name>-<host>-<pid>-<rand>/` and renamed into place
    after its manifest (written last) is complete; a folder without a complete manifest is never
    read as valid, and stale temp folders of dead processes on this host are removed;
  * deterministic: sample i of a source is the i-th kept sample in input order, whatever num_proc.
Readers run in the main process (they only split bytes); decoding, parsing, rendering,
tokenizing and shard writing run in the worker pool, one chunk -> one shard.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from data_pipeline.encoding import EncodeSettings
from data_pipeline.errors import DataError, FieldError
from data_pipeline.fingerprint import duplicate_count
from data_pipeline.formats import detect_format
from data_pipeline.readers import RawRecord, decode_payload, input_checksum, iter_records, list_files
from data_pipeline.shard_cache import default_cache_dir, is_url
from data_pipeline.shards import (FORMAT_VERSION, MANIFEST, ShardedSource, prepared_settings, read_manifest, source_folder,
                                  token_dtype, tokenizer_fingerprint, write_index, write_manifest)
from data_pipeline.spec import FORMATS, DataConfig, DataConfigError, SourceSpec, source_train_on
from data_pipeline.templates import template_spec
from data_pipeline.tokenize_chunk import ChunkJob, ChunkResult, ChunkTask, init_worker, run_chunk

CHUNK_RECORDS = 1024
"""Records per worker task and per shard: large enough to amortise IPC and batch tokenization,
small enough that the last tasks of a run leave no worker idle for long."""
DETECT_LOOKAHEAD = 64
"""format=auto looks at up to this many leading records for one it recognises."""


@dataclass
class SourceReport:
    name: str
    reused: bool
    records: int = 0
    samples: int = 0
    tokens: int = 0
    response_tokens: int = 0
    truncated: int = 0
    duplicates: int = 0
    skips: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        state = "reused (inputs, tokenizer and settings unchanged)" if self.reused else f"{self.seconds:.1f}s"
        head = (f"{self.name}: {self.samples} samples kept of {self.records} records, {self.tokens} tokens, "
                f"{self.response_tokens} response tokens, {self.truncated} truncated, {state}")
        out = [head]
        if self.duplicates:
            out.append(f"  exact duplicates: {self.duplicates} samples repeat an earlier sample of this source "
                       f"({self.duplicates / max(self.samples, 1):.1%}); data.dedup=exact trains on each once")
        if self.skips:
            out.append("  skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skips.items())))
            for ex in self.examples[:6]:
                ex = ex if isinstance(ex, dict) else asdict(ex)
                out.append(f"    {ex['file']}:{ex['line']} [{ex['reason']}] {ex['field']}: {ex['message']}")
        return out


def resolve_num_proc(requested: int) -> int:
    if requested > 0:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _resolve_path(spec: SourceSpec, out_dir: Path) -> str:
    if spec.path.startswith("builtin:"):
        from data_pipeline.demo_data import materialize_builtin

        return str(materialize_builtin(spec.path, out_dir / "_builtin"))
    return spec.path


def _detect(records: Iterator[RawRecord], fmt: str, text_field: str) -> tuple[str, list[RawRecord]]:
    """Resolve format=auto from the first recognisable record; returns the peeked records too."""
    if fmt != "auto":
        return fmt, []
    peeked: list[RawRecord] = []
    first_error: Optional[DataError] = None
    for record in itertools.islice(records, DETECT_LOOKAHEAD):
        peeked.append(record)
        try:
            return detect_format(decode_payload(record), text_field), peeked
        except DataError as err:
            first_error = first_error or (err if err.file else err.located(record.file, record.line))
    if first_error is not None:
        raise first_error
    raise FieldError("the source holds no records", field="path", reason="empty_source")


def _chunks(records: Iterable[RawRecord]) -> Iterator[tuple[int, list[RawRecord]]]:
    """(shard id, up to CHUNK_RECORDS records) in input order."""
    it = iter(records)
    for shard_id in itertools.count():
        chunk = list(itertools.islice(it, CHUNK_RECORDS))
        if not chunk:
            return
        yield shard_id, chunk


def _length_histogram(lengths: np.ndarray) -> dict[str, int]:
    """Samples per power-of-two length bucket, e.g. {"<=64": 10, "<=128": 3}."""
    if len(lengths) == 0:
        return {}
    buckets = np.maximum(0, np.ceil(np.log2(np.maximum(lengths, 1)))).astype(int)
    counts = Counter(buckets.tolist())
    return {f"<={2 ** b}": counts[b] for b in sorted(counts)}


def _clean_stale_temps(out_dir: Path, name: str) -> None:
    """Remove temp folders of this source left by dead processes on this host (a killed run)."""
    host = socket.gethostname()
    for tmp in out_dir.glob(f".tmp-{name}-{host}-*"):
        try:
            pid = int(tmp.name[len(f".tmp-{name}-{host}-"):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def start_method() -> str:
    """How to start prepare's workers. fork shares the already imported modules (a spawned worker
    re-imports transformers and torch: seconds of CPU each), but forking a process in which other
    threads run (torch, gloo, a Rust tokenizer thread pool) can deadlock the child on a lock held at
    fork time (seen: the trainer's rank 0 preparing after distributed init). So: fork only while
    this process has a single OS thread, spawn otherwise. Call it before starting any thread."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    try:
        threads = len(os.listdir("/proc/self/task"))  # OS threads, native ones included (Linux)
    except OSError:
        threads = threading.active_count()
    return "fork" if threads == 1 else "spawn"


def _run_chunks(jobs: dict[str, ChunkJob], chunks: Iterator[ChunkTask], num_proc: int, method: str,
                progress) -> Iterator[ChunkResult]:
    """Results of all chunks of all sources, in input order, from one pool shared by the sources
    (no pool start per source, and no idle worker at a source's tail while chunks are left)."""
    if num_proc <= 1:
        init_worker(jobs)
        for task in chunks:
            result = run_chunk(task)
            progress.update(result.records)
            yield result
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the pool is the parallelism
    with multiprocessing.get_context(method).Pool(num_proc, initializer=init_worker, initargs=(jobs,)) as pool:
        for result in pool.imap(run_chunk, chunks):
            progress.update(result.records)
            yield result


def _upload(tmp: Path, url: str, manifest: dict) -> None:
    """Publish a finished build at an fsspec URL: an outdated manifest is removed first, then the
    data files are uploaded, the manifest last, so that a reader never finds a manifest whose files
    are not all in place. (Files of an older build that the new manifest does not list stay.)"""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(url)
    if fs.exists(f"{root}/{MANIFEST}"):
        fs.rm(f"{root}/{MANIFEST}")
    fs.makedirs(root, exist_ok=True)
    for path in sorted(tmp.iterdir()):
        fs.put_file(str(path), f"{root}/{path.name}")
    write_manifest(tmp, manifest)
    fs.put_file(str(tmp / MANIFEST), f"{root}/{MANIFEST}")
    shutil.rmtree(tmp, ignore_errors=True)


def _finalize(tmp: Path, final: Path, manifest: dict) -> None:
    write_manifest(tmp, manifest)
    if final.exists():
        # Only an outdated or incomplete folder gets here; move it aside first so that the
        # rename below is atomic and a crash leaves either the old or the new folder.
        trash = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        final.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    tmp.rename(final)


@dataclass
class _SourceBuild:
    """One source being tokenized into a temp folder: its job, its input and its growing manifest."""

    spec: SourceSpec
    final: str | Path
    """The source's folder: local, or an fsspec URL the finished build is uploaded to."""
    cache_dir: str
    job: ChunkJob
    records: Iterator[RawRecord]
    manifest: dict
    start_time: float
    report: SourceReport
    shards: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    fingerprints: list = field(default_factory=list)

    @property
    def tmp(self) -> Path:
        return Path(self.job.folder)

    def add(self, result: ChunkResult) -> None:
        _merge(self.report, result)
        if result.tokens:
            self.shards.append({"id": result.shard_id, "token_start": self.report.tokens - result.tokens,
                                "tokens": result.tokens, "samples": result.samples, "files": result.files})
        self.lengths.append(result.lengths)
        self.fingerprints.append(result.fingerprints)

    def finish(self) -> tuple[ShardedSource, SourceReport]:
        """Index + manifest (written last), then the atomic rename into place."""
        report = self.report
        all_lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int32)
        fingerprints = np.concatenate(self.fingerprints) if self.fingerprints else np.zeros(0, dtype=np.uint64)
        index_files = write_index(self.tmp, all_lengths, fingerprints)
        report.duplicates = duplicate_count(fingerprints)
        report.seconds = time.perf_counter() - self.start_time
        manifest = dict(self.manifest, shards=self.shards, index_files=index_files, **{
            "counts": {"records": report.records, "samples": report.samples, "tokens": report.tokens,
                       "response_tokens": report.response_tokens, "truncated": report.truncated,
                       "duplicate_samples": report.duplicates},
            "skips": dict(report.skips), "skip_examples": [asdict(e) for e in report.examples],
            "length_histogram": _length_histogram(all_lengths), "seconds": round(report.seconds, 3),
        })
        if is_url(self.final):
            _upload(self.tmp, str(self.final), manifest)
        else:
            _finalize(self.tmp, self.final, manifest)
        return ShardedSource(self.final, self.spec.name, cache_dir=self.cache_dir or None), report


def _plan(spec: SourceSpec, data_cfg: DataConfig, tokenizer, out_dir: str | Path
          ) -> tuple[ShardedSource, SourceReport] | _SourceBuild:
    """Reuse the source's shards when its inputs, tokenizer and settings are unchanged; else set up
    its build (format detected, temp folder created). For an fsspec URL out_dir the build happens
    in a local staging folder under the shard cache and is uploaded when complete."""
    start_time = time.perf_counter()
    final = source_folder(out_dir, spec.name)
    local_dir = Path(data_cfg.cache_dir or default_cache_dir()) / "staging" if is_url(out_dir) else Path(out_dir)
    files = list_files(_resolve_path(spec, local_dir))
    fingerprint = tokenizer_fingerprint(tokenizer)
    settings = prepared_settings(spec, data_cfg, tokenizer)
    checksum = input_checksum(files)
    existing = read_manifest(final)
    if (existing and existing.get("input_checksum") == checksum and existing.get("tokenizer_fingerprint") == fingerprint
            and existing.get("settings") == settings):
        return ShardedSource(final, spec.name, cache_dir=data_cfg.cache_dir or None), _report_from_manifest(existing)

    records = iter_records(files)
    fmt, peeked = _detect(records, spec.format, spec.text_field)
    vocab_size = len(tokenizer)
    eos = tokenizer.eos_token
    local_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(local_dir, spec.name)
    tmp = local_dir / f".tmp-{spec.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    job = ChunkJob(
        tokenizer_json=tokenizer.backend_tokenizer.to_str(), template=template_spec(data_cfg.template, tokenizer),
        settings=EncodeSettings(data_cfg.seq_len, source_train_on(spec, data_cfg), data_cfg.truncation, eos or ""),
        fmt=fmt, text_field=spec.text_field, strict=data_cfg.on_error == "strict", folder=str(tmp),
        token_dtype=token_dtype(vocab_size).str, eos_id=tokenizer.convert_tokens_to_ids(eos) if eos else None)
    manifest = {
        "format_version": FORMAT_VERSION, "source": spec.name, "files": files, "input_checksum": checksum,
        "input_checksum_kind": "size+mtime (content hash where the store reports no mtime)",
        "tokenizer_fingerprint": fingerprint, "vocab_size": vocab_size, "token_dtype": job.token_dtype,
        "detected_format": fmt, "settings": settings,
    }
    return _SourceBuild(spec, final, data_cfg.cache_dir, job, itertools.chain(peeked, records), manifest, start_time,
                        SourceReport(spec.name, reused=False))


def _prepare_all(specs: list[SourceSpec], data_cfg: DataConfig, tokenizer, out_dir: str | Path, *, show_progress: bool,
                 num_proc: int) -> list[tuple[ShardedSource, SourceReport]]:
    """Prepare (or reuse) each source; the sources to build share one worker pool."""
    done: dict[str, tuple[ShardedSource, SourceReport]] = {}
    builds: dict[str, _SourceBuild] = {}
    try:
        for spec in specs:
            planned = _plan(spec, data_cfg, tokenizer, out_dir)
            if isinstance(planned, _SourceBuild):
                builds[spec.name] = planned
            else:
                done[spec.name] = planned
        if builds:
            from tqdm import tqdm

            tasks = ((name, shard_id, chunk) for name, build in list(builds.items())
                     for shard_id, chunk in _chunks(build.records))
            jobs = {name: build.job for name, build in builds.items()}
            method = start_method()  # before tqdm starts its monitor thread
            with tqdm(desc="prepare " + ",".join(builds), unit="rec", disable=not show_progress,
                      file=sys.stderr) as progress:
                current = None
                for result in _run_chunks(jobs, tasks, resolve_num_proc(num_proc or data_cfg.num_proc), method,
                                          progress):
                    if current is not None and result.source != current:
                        done[current] = builds.pop(current).finish()  # results come in source order
                    current = result.source
                    builds[current].add(result)
            for name in list(builds):  # the last source, and sources without a single record
                done[name] = builds.pop(name).finish()
    finally:
        for build in builds.values():  # failed or interrupted: nothing half-written stays
            shutil.rmtree(build.tmp, ignore_errors=True)
    return [done[spec.name] for spec in specs]


def prepare_source(spec: SourceSpec, data_cfg: DataConfig, tokenizer, out_dir: str | Path, *, show_progress: bool = True,
                   num_proc: int = 0) -> tuple[ShardedSource, SourceReport]:
    """Prepare one source (or reuse its shards); return it opened, with its report."""
    return _prepare_all([spec], data_cfg, tokenizer, out_dir, show_progress=show_progress, num_proc=num_proc)[0]


def _merge(report: SourceReport, result: ChunkResult) -> None:
    report.records += result.records
    report.samples += result.samples
    report.tokens += result.tokens
    report.response_tokens += result.response_tokens
    report.truncated += result.truncated
    for reason, count in result.skips.items():
        report.skips[reason] = report.skips.get(reason, 0) + count
    shown = Counter(e.reason for e in report.examples)
    for ex in result.examples:
        if shown[ex.reason] < 3:
            report.examples.append(ex)
            shown[ex.reason] += 1


def _report_from_manifest(manifest: dict) -> SourceReport:
    counts = manifest["counts"]
    return SourceReport(manifest["source"], reused=True, records=counts["records"], samples=counts["samples"],
                        tokens=counts["tokens"], response_tokens=counts["response_tokens"],
                        truncated=counts["truncated"], duplicates=counts.get("duplicate_samples", 0),
                        skips=manifest.get("skips", {}),
                        examples=manifest.get("skip_examples", []))


def prepare_sources(data_cfg: DataConfig, tokenizer, out_dir: str | Path, *, show_progress: bool = True,
                    num_proc: int = 0) -> list[ShardedSource]:
    """Prepare (or reuse) every source of data_cfg under out_dir; returns them in config order.
    Call on one process per node, then barrier, then open_prepared on every rank."""
    data_cfg.validate()
    prepared = _prepare_all(data_cfg.sources, data_cfg, tokenizer, out_dir, show_progress=show_progress,
                            num_proc=num_proc)
    sources, reports = [p[0] for p in prepared], [p[1] for p in prepared]
    if show_progress:
        print(format_report(reports), file=sys.stderr)
    return sources


def format_report(reports: list[SourceReport]) -> str:
    return "\n".join(["prepare report:"] + [line for r in reports for line in r.lines()])


# ----------------------------------------------------------------------------- CLI

def parse_source_arg(text: str) -> SourceSpec:
    """NAME=PATH[:FORMAT]; the format suffix is recognised only if it names a format, so URLs
    such as file:///x or memory://x keep their colons."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise DataConfigError(f"--source {text!r}: expected NAME=PATH[:FORMAT]")
    path, _, fmt = rest.rpartition(":")
    if path and fmt in FORMATS:
        return SourceSpec(name=name, path=path, format=fmt)
    return SourceSpec(name=name, path=rest)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", action="append", required=True, type=str, help="NAME=PATH[:FORMAT], repeatable")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (AutoTokenizer.from_pretrained)")
    p.add_argument("--out", required=True, help="output folder (or fsspec URL) for the prepared sources")
    p.add_argument("--cache-dir", default="", help="local staging/cache folder when --out is a URL")
    defaults = DataConfig()
    p.add_argument("--template", default=defaults.template)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--train-on", default=defaults.train_on)
    p.add_argument("--truncation", default=defaults.truncation)
    p.add_argument("--on-error", default=defaults.on_error)
    p.add_argument("--num-proc", type=int, default=defaults.num_proc)
    p.add_argument("--text-field", default="text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        sources = [parse_source_arg(s) for s in args.source]
        for s in sources:
            s.text_field = args.text_field
        cfg = DataConfig(sources=sources, template=args.template, seq_len=args.seq_len, train_on=args.train_on,
                         truncation=args.truncation, on_error=args.on_error, num_proc=args.num_proc,
                         cache_dir=args.cache_dir)
        cfg.validate("--source/--options")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        reports = [prepare_source(s, cfg, tokenizer, args.out, show_progress=not args.quiet)[1] for s in sources]
    except (DataError, DataConfigError) as err:
        print(f"prepare: error: {err}", file=sys.stderr)
        return 2
    print(format_report(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
