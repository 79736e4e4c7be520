"""`prepare`: raw sources -> per-source tokenized shards + manifest, on all cores.

    python -m data_pipeline.prepare --source NAME=PATH[:FORMAT] ... --tokenizer DIR --out DIR \
        [--template auto] [--seq-len 1024] [--train-on all_assistant] [--on-error skip] [--num-proc 0]
    (--help lists every option with its choices and default)

Guarantees:
  * idempotent: a source whose inputs (see readers.input_checksum), tokenizer fingerprint and
    token-level settings match an existing complete manifest is reused, not re-tokenized;
  * kill-safe: a source is built in `<out>/.tmp-<name>-<host>-<pid>-<rand>/` and renamed into place
    after its manifest (written last) is complete; a folder without a complete manifest is never
    read as valid, and stale temp folders of dead processes on this host are removed;
  * deletes only what it made: a folder is replaced or removed only when it holds nothing but the
    files prepare writes (shards.is_prepared_folder); source names are single folder names;
  * no silent empty source: a source that keeps no sample, or skips more than
    data.max_skip_fraction of its records, is an error naming it (prepare_report.check_source);
  * a dead worker (e.g. killed for memory) fails the run within moments, naming the chunk it held
    (worker_pool.py); the next run starts clean;
  * deterministic: sample i of a source is the i-th kept sample in input order, whatever num_proc.
Readers run in the main process (they only split bytes); decoding, parsing, rendering,
tokenizing and shard writing run in the worker pool (and in this process whenever the pool has
enough chunks in flight; inputs under SMALL_INPUT_BYTES run here alone), one chunk -> one shard.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from data_pipeline.ingest.demo_data import materialize_builtin
from data_pipeline.render.encoding import EncodeSettings
from data_pipeline.render.fast_bpe import ENGINE_FAST, ENGINE_HF, fast_bpe_plan
from data_pipeline.errors import DataError, SourceRejected
from data_pipeline.store.fingerprint import duplicate_count
from data_pipeline.ingest.formats import detect_format
from data_pipeline.store.prepare_cli import build_arg_parser, load_tokenizer, parse_source_arg
from data_pipeline.store.prepare_report import SourceReport, check_source, format_report, merge_result, report_from_manifest
from data_pipeline.store.prepared_folders import (BUILTIN_FOLDER, check_replaceable, clean_stale_temps, temp_folder_name,
                                            without_own_output)
from data_pipeline.ingest.readers import RawRecord, decode_payload, input_checksum, iter_records, list_files
from data_pipeline.store.shard_cache import default_cache_dir, is_url
from data_pipeline.store.shards import (FORMAT_VERSION, MANIFEST, ShardedSource, prepared_settings, read_manifest,
                                  source_folder, token_dtype, tokenizer_fingerprint, write_index, write_manifest)
from data_pipeline.spec import DataConfig, DataConfigError, SourceSpec, check_source_name, source_train_on
from data_pipeline.selection.split import held_out_count
from data_pipeline.render.templates import source_template_spec
from data_pipeline.store.tokenize_chunk import ChunkJob, ChunkResult, ChunkTask, init_worker, run_chunk
from data_pipeline.store.worker_pool import run_ordered, start_method

CHUNK_RECORDS = 1024
"""Records per worker task and per shard: large enough to amortise IPC and batch tokenization,
small enough that the last tasks of a run leave no worker idle for long."""
SMALL_INPUT_BYTES = 256 * 1024
"""Inputs smaller than this in all (a chunk or two of records) are prepared in this process: a
worker pool would cost more to start than it saves."""
DETECT_LOOKAHEAD = 64
"""format=auto looks at up to this many leading records for one it recognises."""


def resolve_num_proc(requested: int) -> int:
    if requested > 0:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _input_bytes(builds) -> int:
    """Total size of the builds' input files; remote or unreadable ones count as large."""
    total = 0
    for build in builds:
        for file in build.manifest["files"]:
            try:
                total += SMALL_INPUT_BYTES if is_url(file) else os.path.getsize(file)
            except OSError:
                total += SMALL_INPUT_BYTES
    return total


def _resolve_path(spec: SourceSpec, out_dir: Path) -> str:
    if spec.path.startswith("builtin:"):
        return str(materialize_builtin(spec.path, out_dir / BUILTIN_FOLDER))
    return spec.path


def _detect(records: Iterator[RawRecord], fmt: str, text_field: str, files: list[str]) -> tuple[str, list[RawRecord]]:
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
            first_error = first_error or (err if err.file else err.located(record.file, record.line, record.index))
    if first_error is not None:
        raise first_error
    raise SourceRejected("the source holds no records", file=", ".join(files), reason="empty_source")


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


def _run_chunks(jobs: dict[str, ChunkJob], chunks: Iterator[ChunkTask], num_proc: int, method: str,
                progress) -> Iterator[ChunkResult]:
    """Results of all chunks of all sources, in input order, from one pool shared by the sources
    (no pool start per source, and no idle worker at a source's tail while chunks are left)."""
    if num_proc <= 1:
        init_worker(jobs)
        results = (run_chunk(task) for task in chunks)
    else:
        results = run_ordered(jobs, chunks, num_proc, method)
    for result in results:
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
    check_replaceable(final)
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
        merge_result(self.report, result)
        if result.tokens:
            self.shards.append({"id": result.shard_id, "token_start": self.report.tokens - result.tokens,
                                "tokens": result.tokens, "samples": result.samples, "files": result.files})
        self.lengths.append(result.lengths)
        self.fingerprints.append(result.fingerprints)

    def finish(self, key: str, data_cfg: DataConfig) -> tuple[ShardedSource, SourceReport]:
        """The source checked (check_source), then index + manifest (written last), then the atomic
        rename into place."""
        report = self.report
        check_source(report, self.spec, data_cfg, key)
        all_lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int32)
        fingerprints = np.concatenate(self.fingerprints) if self.fingerprints else np.zeros(0, dtype=np.uint64)
        index_files = write_index(self.tmp, all_lengths, fingerprints)
        report.duplicates = duplicate_count(fingerprints)
        report.seconds = time.perf_counter() - self.start_time
        manifest = dict(self.manifest, shards=self.shards, index_files=index_files, **{
            "counts": {"records": report.records, "kept_records": report.kept, "samples": report.samples,
                       "tokens": report.tokens,
                       "response_tokens": report.response_tokens, "truncated": report.truncated,
                       "duplicate_samples": report.duplicates, "excluded": report.excluded},
            "skips": dict(report.skips), "skip_examples": [asdict(e) for e in report.examples],
            "rendering": dict(sorted(report.rendering.items())),
            "length_histogram": _length_histogram(all_lengths), "seconds": round(report.seconds, 3),
        })
        if is_url(self.final):
            _upload(self.tmp, str(self.final), manifest)
        else:
            _finalize(self.tmp, self.final, manifest)
        return ShardedSource(self.final, self.spec.name, cache_dir=self.cache_dir or None), report


def _plan(spec: SourceSpec, data_cfg: DataConfig, tokenizer, out_dir: str | Path, key: str
          ) -> tuple[ShardedSource, SourceReport] | _SourceBuild:
    """Reuse the source's shards when its inputs, tokenizer and settings are unchanged; else set up
    its build (format detected, temp folder created). For an fsspec URL out_dir the build happens
    in a local staging folder under the shard cache and is uploaded when complete."""
    start_time = time.perf_counter()
    check_source_name(spec.name, f"{key}.name")
    final = source_folder(out_dir, spec.name)
    local_dir = Path(data_cfg.cache_dir or default_cache_dir()) / "staging" if is_url(out_dir) else Path(out_dir)
    if local_dir.exists() and not local_dir.is_dir():
        raise DataError("the output folder is an existing file, not a folder; choose another --out / "
                        "data.prepared_dir", file=str(local_dir), reason="output_exists")
    if not is_url(final):
        check_replaceable(final)
    files = list_files(_resolve_path(spec, local_dir))
    if not spec.path.startswith("builtin:"):  # a builtin: source is written under the output folder on purpose
        files = without_own_output(files, local_dir, spec.path)
    fingerprint = tokenizer_fingerprint(tokenizer)
    settings = prepared_settings(spec, data_cfg, tokenizer)
    checksum = input_checksum(files)
    existing = read_manifest(final)
    if (existing and existing.get("input_checksum") == checksum and existing.get("tokenizer_fingerprint") == fingerprint
            and existing.get("settings") == settings):
        report = report_from_manifest(existing)
        check_source(report, spec, data_cfg, key)
        return ShardedSource(final, spec.name, cache_dir=data_cfg.cache_dir or None), report

    records = iter_records(files)
    fmt, peeked = _detect(records, spec.format, spec.text_field, files)
    vocab_size = len(tokenizer)
    eos = tokenizer.eos_token
    local_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(local_dir, spec.name)
    tmp = local_dir / temp_folder_name(spec.name)
    tmp.mkdir()
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    fast_plan, not_fast = fast_bpe_plan(tokenizer_json)
    job = ChunkJob(
        tokenizer_json=tokenizer_json, template=source_template_spec(spec, data_cfg, tokenizer),
        settings=EncodeSettings(data_cfg.seq_len, source_train_on(spec, data_cfg), data_cfg.truncation, eos or ""),
        fmt=fmt, text_field=spec.text_field, strict=data_cfg.on_error == "strict", folder=str(tmp),
        token_dtype=token_dtype(vocab_size).str, eos_id=tokenizer.convert_tokens_to_ids(eos) if eos else None,
        fast_bpe=fast_plan)
    manifest = {
        "format_version": FORMAT_VERSION, "source": spec.name, "files": files, "input_checksum": checksum,
        "input_checksum_kind": "size+mtime (content hash where the store reports no mtime)",
        "tokenizer_fingerprint": fingerprint, "vocab_size": vocab_size, "token_dtype": job.token_dtype,
        "detected_format": fmt, "settings": settings,
        "encoder": {"engine": ENGINE_FAST} if fast_plan else {"engine": ENGINE_HF, "why_not_fast": not_fast},
    }
    return _SourceBuild(spec, final, data_cfg.cache_dir, job, itertools.chain(peeked, records), manifest, start_time,
                        SourceReport(spec.name, reused=False, files=files, detected_format=fmt))


def _prepare_all(specs: list[SourceSpec], data_cfg: DataConfig, tokenizer, out_dir: str | Path, *, show_progress: bool,
                 num_proc: int, key: str = "data.sources") -> list[tuple[ShardedSource, SourceReport]]:
    """Prepare (or reuse) each source; the sources to build share one worker pool. Whatever fails,
    the temp folders of unfinished builds are removed, and nothing else is."""
    done: dict[str, tuple[ShardedSource, SourceReport]] = {}
    builds: dict[str, _SourceBuild] = {}
    keys = {spec.name: f"{key}[{i}]" for i, spec in enumerate(specs)}
    try:
        for spec in specs:
            planned = _plan(spec, data_cfg, tokenizer, out_dir, keys[spec.name])
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
                workers = resolve_num_proc(num_proc or data_cfg.num_proc)
                if _input_bytes(builds.values()) < SMALL_INPUT_BYTES:
                    workers = 1
                for result in _run_chunks(jobs, tasks, workers, method, progress):
                    if current is not None and result.source != current:
                        _finish(current, builds, done, keys, data_cfg)  # results come in source order
                    current = result.source
                    builds[current].add(result)
            for name in list(builds):  # the last source, and sources without a single record
                _finish(name, builds, done, keys, data_cfg)
    finally:
        for build in builds.values():  # failed or interrupted: nothing half-written stays
            shutil.rmtree(build.tmp, ignore_errors=True)
    return [done[spec.name] for spec in specs]


def _finish(name: str, builds: dict, done: dict, keys: dict, data_cfg: DataConfig) -> None:
    """Finish one build; it leaves `builds` only once finished, so a failure still removes its temp folder."""
    done[name] = builds[name].finish(keys[name], data_cfg)
    del builds[name]


def prepare_source(spec: SourceSpec, data_cfg: DataConfig, tokenizer, out_dir: str | Path, *, show_progress: bool = True,
                   num_proc: int = 0) -> tuple[ShardedSource, SourceReport]:
    """Prepare one source (or reuse its shards); return it opened, with its report."""
    return _prepare_all([spec], data_cfg, tokenizer, out_dir, show_progress=show_progress, num_proc=num_proc)[0]


def prepare_sources(data_cfg: DataConfig, tokenizer, out_dir: str | Path, *, show_progress: bool = True,
                    num_proc: int = 0, key: str = "data.sources") -> list[ShardedSource]:
    """Prepare (or reuse) every source of data_cfg under out_dir; returns them in config order.
    Call on one process per node, then barrier, then open_prepared on every rank. `key` is what
    errors call data_cfg.sources (e.g. "data.eval_sources" when those are prepared this way)."""
    data_cfg.validate()
    prepared = _prepare_all(data_cfg.sources, data_cfg, tokenizer, out_dir, show_progress=show_progress,
                            num_proc=num_proc, key=key)
    sources, reports = [p[0] for p in prepared], [p[1] for p in prepared]
    for i, (spec, report) in enumerate(zip(data_cfg.sources, reports)):
        held_out_count(spec, report.samples, f"{key}[{i}]")  # a split that leaves nothing fails now, not later
    if show_progress:
        print(format_report(reports), file=sys.stderr)
    return sources


# ----------------------------------------------------------------------------- CLI

def main(argv: Optional[list[str]] = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        sources = [parse_source_arg(s) for s in args.source]
        for s in sources:
            s.text_field = args.text_field
        cfg = DataConfig(sources=sources, template=args.template, template_kwargs=args.template_kwargs,
                         reasoning_turns=args.reasoning_turns, seq_len=args.seq_len, train_on=args.train_on,
                         truncation=args.truncation, on_error=args.on_error, num_proc=args.num_proc,
                         cache_dir=args.cache_dir, max_skip_fraction=args.max_skip_fraction)
        cfg.validate("--source/--options")
        if not is_url(args.out) and Path(args.out).exists() and not Path(args.out).is_dir():
            raise DataConfigError(f"--out {args.out}: is an existing file, not a folder")
        tokenizer = load_tokenizer(args.tokenizer)
        reports = [p[1] for p in _prepare_all(sources, cfg, tokenizer, args.out, show_progress=not args.quiet,
                                              num_proc=args.num_proc, key="--source")]
    except (DataError, DataConfigError) as err:
        print(f"prepare: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the output folder cannot be written: permissions, a full disk
        print(f"prepare: error: {err}", file=sys.stderr)
        return 2
    print(format_report(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
