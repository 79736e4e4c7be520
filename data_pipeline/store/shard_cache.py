"""Local cache of a prepared source folder that lives at an fsspec URL (s3://, gs://, memory://, ...).

Shards are memory-mapped, and a memory map needs a local file: each file is copied into
`<cache_dir>/<key>/` the first time it is needed, checked against the size and sha256 the
manifest records, and only then renamed into place (a crash or a concurrent reader on the same
node never sees a partial file; two ranks copying the same file at once both succeed). The key
hashes the URL and the manifest text, so re-preparing the remote folder never serves stale copies.
A background thread copies the next shards ahead of use, so that a reader rarely waits.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import uuid
from pathlib import Path
from typing import Optional

from data_pipeline.errors import PreparedDataError

COPY_BLOCK = 8 << 20


def is_url(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/zhiling/shards, else ~/.cache/zhiling/shards."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zhiling" / "shards"


def file_record(data: bytes) -> dict:
    """What the manifest stores about one written file, to verify copies of it."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class ShardCache:
    """Verified local copies of the files of one remote prepared folder."""

    def __init__(self, url: str, manifest_text: str, cache_dir: str | Path | None, prefetch: int = 2) -> None:
        from fsspec.core import url_to_fs

        self.url = url.rstrip("/")
        self.fs, self.root = url_to_fs(self.url)
        key = hashlib.sha256(f"{self.url}\0{manifest_text}".encode()).hexdigest()[:20]
        self.folder = Path(cache_dir or default_cache_dir()) / key
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefetch_depth = prefetch
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._queue: "queue.Queue[Optional[tuple[str, Optional[dict]]]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self.copied: list[str] = []
        """Names copied by this process, in order (diagnostics, tests)."""
        self.prefetch_errors: list[str] = []

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    def local(self, name: str, expected: Optional[dict]) -> Path:
        """The local path of file `name`, copied and verified first if it is not cached yet."""
        target = self.folder / name
        with self._lock(name):
            if target.exists() and (expected is None or target.stat().st_size == expected["size"]):
                return target
            self._copy(name, target, expected)
        return target

    def _copy(self, name: str, target: Path, expected: Optional[dict]) -> None:
        remote = f"{self.root}/{name}"
        partial = target.with_name(f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
        digest, size = hashlib.sha256(), 0
        try:
            with self.fs.open(remote, "rb") as src, partial.open("wb") as dst:
                for block in iter(lambda: src.read(COPY_BLOCK), b""):
                    digest.update(block)
                    size += len(block)
                    dst.write(block)
            if expected is not None and (size != expected["size"] or digest.hexdigest() != expected["sha256"]):
                raise PreparedDataError(
                    f"copy of {name} has size {size} / sha256 {digest.hexdigest()[:12]}..., the manifest says "
                    f"{expected['size']} / {expected['sha256'][:12]}... (changed or corrupt remote file)",
                    file=f"{self.url}/{name}", field="manifest.json files", reason="corrupt_prepared")
            os.replace(partial, target)
        except FileNotFoundError:
            raise PreparedDataError("file listed in the manifest is missing", file=f"{self.url}/{name}",
                                    reason="corrupt_prepared") from None
        finally:
            partial.unlink(missing_ok=True)
        self.copied.append(name)

    def prefetch(self, files: list[tuple[str, Optional[dict]]]) -> None:
        """Copy these files in the background (in order), if not cached yet."""
        if self.prefetch_depth <= 0:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._prefetch_loop, name="shard-prefetch", daemon=True)
            self._thread.start()
        for item in files:
            if not (self.folder / item[0]).exists():
                self._queue.put(item)

    def _prefetch_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.local(*item)
            except Exception as e:  # the reader will copy it itself and raise the error where it is needed
                self.prefetch_errors.append(f"{item[0]}: {e}")
            finally:
                self._queue.task_done()

    def wait_idle(self) -> None:
        """Block until every queued prefetch is done (tests, orderly shutdown)."""
        self._queue.join()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None
