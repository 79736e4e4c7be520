"""prepare's worker processes: chunk tasks in, results out in input order, and a prompt error
(never a hang) when a worker dies.

Why concurrent.futures and not multiprocessing.Pool: when a Pool worker is killed (the
out-of-memory killer sends SIGKILL) the Pool starts a replacement but the task is lost, and
`imap` waits for its result forever. ProcessPoolExecutor notices the dead process and fails every
pending future (BrokenProcessPool) at once, which is turned into a WorkerDied naming the chunk.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import types
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Iterator

from data_pipeline.errors import WorkerDied
from data_pipeline.store.tokenize_chunk import ChunkJob, ChunkResult, ChunkTask, init_worker, run_chunk

TASKS_PER_WORKER_IN_FLIGHT = 2
"""Chunks submitted ahead per worker: enough that no worker waits for the reader, few enough that
the records held in memory stay bounded."""
MAX_HELD_RESULTS = 64
"""Finished chunks held back at most while an older one is still running (results leave in order)."""


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


@contextmanager
def main_module_hidden(method: str) -> Iterator[None]:
    """While spawned workers start, hide the parent's __main__ from them.

    A spawned process re-imports the parent's main script to rebuild its globals, so a script that
    calls prepare_sources at top level, without an `if __name__ == "__main__":` guard, would run
    again inside every worker (and fail the pool). The workers need nothing from __main__: their
    tasks hold only data_pipeline types. An empty stand-in has no file and no module name, so
    multiprocessing has nothing to re-import."""
    if method == "fork":
        yield
        return
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def _describe_task(task: ChunkTask) -> str:
    name, shard_id, records = task
    where = ""
    if records:
        first, last = records[0], records[-1]
        span = f"{first.line}" if first.file != last.file or first.line == last.line else f"{first.line}-{last.line}"
        where = f" (records at {first.file}:{span})"
    return f"source {name!r} chunk {shard_id}{where}"


def _how_workers_ended(processes: list) -> str:
    codes = []
    for process in processes:
        code = process.exitcode
        if code is None or code == -signal.SIGTERM:  # still running, or stopped by the executor itself
            continue
        codes.append(f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}")
    if not codes:
        return "ended without a result"
    hint = "; SIGKILL is what the out-of-memory killer sends" if any("SIGKILL" in c for c in codes) else ""
    return ", ".join(sorted(set(codes))) + hint


def _ready() -> None:
    """A no-op task: submitting one starts a worker."""


def _start_all(pool: ProcessPoolExecutor, num_proc: int, method: str) -> None:
    """Start every worker now, while __main__ is hidden. With spawn, ProcessPoolExecutor starts
    workers lazily, one per submit that finds no idle worker, so later submits would start workers
    that re-import the caller's main script. Each no-op submit here finds no idle worker (none
    has started yet), so num_proc of them start all num_proc workers; later submits start none."""
    with main_module_hidden(method):
        for _ in range(num_proc):
            pool.submit(_ready)
        for _ in range(4 * num_proc):  # a worker already idle took one (it cannot have, in practice)
            if len(getattr(pool, "_processes", None) or {}) >= num_proc:
                break
            pool.submit(_ready)


def _run_here(task: ChunkTask) -> Future:
    """A chunk run in this process, as a finished future (its error, if any, raised in order)."""
    future: Future = Future()
    try:
        future.set_result(run_chunk(task))
    except Exception as err:  # re-raised by future.result(), in input order (strict mode's first error first)
        future.set_exception(err)
    return future


def run_ordered(jobs: dict[str, ChunkJob], tasks: Iterator[ChunkTask], num_proc: int, method: str
                ) -> Iterator[ChunkResult]:
    """Results of `tasks` in input order, from `num_proc` worker processes started with `method`
    and from this process: whenever the workers have TASKS_PER_WORKER_IN_FLIGHT chunks each in
    flight (and while they start: a spawned worker needs a second or so), this process runs the
    next chunk itself instead of waiting. A worker that dies raises WorkerDied for the oldest
    unfinished chunk within moments."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the pool is the parallelism
    pool = ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context(method), initializer=init_worker,
                               initargs=(jobs,))
    pending: deque[tuple[ChunkTask, Future]] = deque()
    processes: dict[int, object] = {}
    window = max(1, num_proc * TASKS_PER_WORKER_IN_FLIGHT)
    try:
        _start_all(pool, num_proc, method)
        init_worker(jobs)  # this process takes chunks too
        for task in tasks:
            if sum(not future.done() for _, future in pending) >= window:
                pending.append((task, _run_here(task)))
            else:
                try:
                    future = pool.submit(run_chunk, task)
                except BrokenProcessPool:
                    pool.shutdown(wait=True, cancel_futures=True)
                    while pending:  # chunks finished before the break still count; the first unfinished raises
                        yield _result(pending, processes, pool)
                    raise _worker_died(task, [], processes) from None
                pending.append((task, future))
            processes.update(getattr(pool, "_processes", None) or {})  # kept to tell how a dead worker ended
            while pending and (pending[0][1].done() or len(pending) >= MAX_HELD_RESULTS):
                yield _result(pending, processes, pool)
        while pending:
            yield _result(pending, processes, pool)
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_died(task: ChunkTask, others: list[int], processes: dict) -> WorkerDied:
    in_flight = f"; chunks {others} of the same run were in flight too" if others else ""
    records = task[2]
    return WorkerDied(
        f"a prepare worker process died ({_how_workers_ended(list(processes.values()))}) while "
        f"{_describe_task(task)} was being tokenized{in_flight}. If it ran out of memory, lower "
        "--num-proc / data.num_proc or look for huge records in that chunk; otherwise run again "
        "(finished sources are reused)", file=records[0].file if records else "",
        line=records[0].line if records else None)


def _result(pending: deque, processes: dict, pool: ProcessPoolExecutor) -> ChunkResult:
    task, future = pending[0]
    try:
        result = future.result()
    except BrokenProcessPool:
        pool.shutdown(wait=True, cancel_futures=True)  # every worker reaped: their exit codes are known
        raise _worker_died(task, [t[1] for t, _ in list(pending)[1:]], processes) from None
    pending.popleft()
    return result
