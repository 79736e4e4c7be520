"""Tokenized shard store: writer (one shard per prepare chunk) and memory-mapped reader.

Layout of one prepared source folder `<out_dir>/<source name>/`:
    manifest.json          written last; a folder without it (or with "complete" != true) is invalid
    lengths.npy            int32 [N]   tokens per sample (memory-mapped, never read in full on open)
    offsets.npy            int64 [N+1] start of each sample in the concatenated token stream
    fingerprints.npy       uint64 [N]  exact-duplicate fingerprint per sample (fingerprint.py)
    tokens-XXXXX.bin       token ids of shard X, uint16 if the vocab fits (<= 65535 ids) else uint32
    mask-XXXXX.bin         loss mask of shard X as bits (numpy packbits, little bit order)
Shard X covers global token positions [manifest.shards[X].token_start, + tokens).
The manifest records size and sha256 of every file (shards[X].files, index_files), so that copies
of a folder kept at an fsspec URL are verified when cached locally (shard_cache.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from data_pipeline.errors import PreparedDataError
from data_pipeline.schedule.labels import IGNORE_INDEX
from data_pipeline.store.shard_cache import ShardCache, file_record, is_url
from data_pipeline.spec import check_source_name, source_train_on
from data_pipeline.render.templates import source_template_spec

FORMAT_VERSION = 3
"""2: special-token text in the data is tokenized as plain text (special_text.py).
3: fingerprints.npy beside the index (fingerprint.py); older folders are prepared again."""
MANIFEST = "manifest.json"
_FOLDER_FILE = re.compile(r"(tokens|mask)-\d{5,}\.bin|(lengths|offsets|fingerprints)\.npy|manifest\.json(\.tmp)?")
"""The names of every file prepare writes into a source folder (see the layout above)."""


def is_prepared_folder(folder: Path) -> bool:
    """True when `folder` holds nothing but files prepare writes (a finished or interrupted build,
    or nothing at all): the only kind of folder prepare ever replaces or removes. A user's own
    folder that happens to have a source's name is never one (a link neither)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    return all(entry.is_file() and not entry.is_symlink() and _FOLDER_FILE.fullmatch(entry.name)
               for entry in folder.iterdir())


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides token ids: the backend's full serialisation (vocab, merges,
    normaliser, pre-tokenizer, added/special tokens), the chat template and the special-token map."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def shard_file(folder: Path, kind: str, shard_id: int) -> Path:
    ext = "bin"
    return folder / f"{kind}-{shard_id:05d}.{ext}"


@dataclass
class ShardWriter:
    """Accumulates encoded samples of one chunk and writes them as one shard."""

    folder: Path
    shard_id: int
    dtype: np.dtype
    _ids: list[np.ndarray] = field(default_factory=list)
    _masks: list[np.ndarray] = field(default_factory=list)
    files: dict[str, dict] = field(default_factory=dict)
    """{file name: {size, sha256}} of what close() wrote."""

    def add(self, input_ids: np.ndarray, trained: np.ndarray) -> None:
        self._ids.append(input_ids)
        self._masks.append(trained)

    @property
    def num_samples(self) -> int:
        return len(self._ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self._ids), dtype=np.int32, count=len(self._ids))

    def close(self) -> int:
        """Write the shard (nothing when empty); return the number of tokens written."""
        if not self._ids:
            return 0
        ids = np.concatenate(self._ids)
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max):
            raise PreparedDataError(f"token id {int(ids.max())} does not fit {self.dtype}", field="vocab_size")
        self._write("tokens", ids.astype(self.dtype).tobytes())
        self._write("mask", np.packbits(np.concatenate(self._masks), bitorder="little").tobytes())
        return int(ids.size)

    def _write(self, kind: str, data: bytes) -> None:
        path = shard_file(self.folder, kind, self.shard_id)
        path.write_bytes(data)
        self.files[path.name] = file_record(data)


def write_index(folder: Path, lengths: np.ndarray, fingerprints: np.ndarray) -> dict[str, dict]:
    """Write lengths.npy, offsets.npy and fingerprints.npy; return their {name: {size, sha256}}."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    records = {}
    arrays = (("lengths.npy", lengths.astype(np.int32)), ("offsets.npy", offsets),
              ("fingerprints.npy", fingerprints.astype(np.uint64)))
    for name, array in arrays:
        np.save(folder / name, array)
        records[name] = file_record((folder / name).read_bytes())
    return records


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Written last and atomically (temp file + rename), so a half-written manifest never exists."""
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(dict(manifest, complete=True), ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(folder / MANIFEST)


def read_manifest_text(folder: str | Path) -> Optional[str]:
    """The manifest file's text (local folder or fsspec URL), or None if it cannot be read."""
    try:
        if is_url(folder):
            import fsspec

            with fsspec.open(f"{str(folder).rstrip('/')}/{MANIFEST}", "r", encoding="utf-8") as f:
                return f.read()
        return (Path(folder) / MANIFEST).read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None


def read_manifest(folder: str | Path, text: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The manifest of a complete prepared folder, or None if absent, unreadable or incomplete."""
    text = read_manifest_text(folder) if text is None else text
    try:
        manifest = json.loads(text) if text is not None else None
    except ValueError:
        return None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        return None
    if manifest.get("format_version") != FORMAT_VERSION:
        return None
    return manifest


class ShardedSource:
    """A prepared source opened for reading: implements spec.SampleSource.

    Opening reads only the manifest and memory-maps the index; shard files are mapped on first use.
    """

    def __init__(self, folder: str | Path, name: Optional[str] = None, *, cache_dir: str | Path | None = None,
                 prefetch_shards: int = 2) -> None:
        """`folder` is a local folder or an fsspec URL; for a URL, files are copied to `cache_dir`
        (default: shard_cache.default_cache_dir()) when first needed, `prefetch_shards` ahead."""
        self.folder = folder if is_url(folder) else Path(folder)
        text = read_manifest_text(self.folder)
        manifest = read_manifest(self.folder, text)
        if manifest is None:
            raise PreparedDataError("no complete manifest.json (preparation missing or interrupted); run prepare",
                                    file=str(self.folder), field=MANIFEST, reason="not_prepared")
        self.manifest = manifest
        self.name = name or manifest["source"]
        self.cache = ShardCache(str(self.folder), text, cache_dir, prefetch_shards) if is_url(self.folder) else None
        self._dtype = np.dtype(manifest["token_dtype"])
        self._shard_ids = [s["id"] for s in manifest["shards"]]
        self._shard_starts = np.array([s["token_start"] for s in manifest["shards"]], dtype=np.int64)
        num = int(manifest["counts"]["samples"])
        if num:
            self._lengths = np.load(self._path("lengths.npy", manifest.get("index_files", {})), mmap_mode="r")
            self._offsets = np.load(self._path("offsets.npy", manifest.get("index_files", {})), mmap_mode="r")
        else:
            self._lengths = np.zeros(0, dtype=np.int32)
            self._offsets = np.zeros(1, dtype=np.int64)
        if len(self._lengths) != num:
            raise PreparedDataError(f"lengths.npy has {len(self._lengths)} entries, manifest says {num}",
                                    file=f"{self.folder}/lengths.npy", reason="corrupt_prepared")
        self._maps: dict[int, tuple[np.memmap, np.memmap]] = {}

    def _path(self, name: str, records: dict[str, dict]) -> Path:
        """Local path of one file of the folder (copied into the cache first for a URL)."""
        if self.cache is None:
            return self.folder / name
        return self.cache.local(name, records.get(name))

    def _shard_files(self, k: int) -> list[tuple[str, Optional[dict]]]:
        sid, records = self._shard_ids[k], self.manifest["shards"][k].get("files", {})
        return [(shard_file(Path(), kind, sid).name, records.get(shard_file(Path(), kind, sid).name))
                for kind in ("tokens", "mask")]

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    @property
    def fingerprints(self) -> Optional[np.ndarray]:
        """uint64 [N] per-sample fingerprints, or None for a folder prepared before they existed."""
        index_files = self.manifest.get("index_files", {})
        if "fingerprints.npy" not in index_files:
            return None
        if len(self) == 0:
            return np.zeros(0, dtype=np.uint64)
        return np.load(self._path("fingerprints.npy", index_files), mmap_mode="r")

    def _shard(self, position: int) -> tuple[int, np.memmap, np.memmap]:
        k = int(np.searchsorted(self._shard_starts, position, side="right")) - 1
        if k not in self._maps:
            (tokens, tokens_record), (mask, mask_record) = self._shard_files(k)
            self._maps[k] = (np.memmap(self._path(tokens, {tokens: tokens_record}), dtype=self._dtype, mode="r"),
                             np.memmap(self._path(mask, {mask: mask_record}), dtype=np.uint8, mode="r"))
            if self.cache is not None:  # the shard in use first, then the next ones in the background
                ahead = range(k + 1, min(k + 1 + self.cache.prefetch_depth, len(self._shard_ids)))
                self.cache.prefetch([f for j in ahead for f in self._shard_files(j)])
        return (k, *self._maps[k])

    def get_tokens_and_mask(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int64 [n], trained bool [n]) of sample `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for source {self.name!r} with {len(self)} samples")
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        k, tokens, mask = self._shard(start)
        local = start - int(self._shard_starts[k])
        n = end - start
        ids = np.asarray(tokens[local:local + n], dtype=np.int64)
        first_byte, bit = divmod(local, 8)
        bits = np.unpackbits(mask[first_byte:(local + n + 7) // 8], bitorder="little")[bit:bit + n]
        return ids, bits.astype(bool)

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        ids, trained = self.get_tokens_and_mask(index)
        return ids, np.where(trained, ids, IGNORE_INDEX)


def prepared_settings(spec, data_cfg, tokenizer) -> dict[str, Any]:
    """The settings that decide a prepared source's content (besides inputs and tokenizer).
    prepare reuses shards only when these match; open_prepared refuses them otherwise."""
    template = source_template_spec(spec, data_cfg, tokenizer)
    return {
        "format": spec.format,
        "text_field": spec.text_field,
        "template": template.name,
        "template_fingerprint": template.fingerprint(),
        "train_on": source_train_on(spec, data_cfg),
        "seq_len": data_cfg.seq_len,
        "truncation": data_cfg.truncation,
        "on_error": data_cfg.on_error,
    }


def source_folder(out_dir: str | Path, source_name: str) -> str | Path:
    """<out_dir>/<source name>: a Path, or a URL string when out_dir is an fsspec URL. The name is
    checked first: it must name one folder inside out_dir, never out_dir itself or its parent."""
    check_source_name(source_name, "source name")
    if is_url(out_dir):
        return f"{str(out_dir).rstrip('/')}/{source_name}"
    return Path(out_dir) / source_name


def open_prepared(data_cfg, tokenizer, out_dir: str | Path) -> list[ShardedSource]:
    """Open every source of data_cfg (same order) from out_dir, refusing shards that were prepared
    with another tokenizer or other token-level settings (template, train_on, seq_len, truncation).
    out_dir may be an fsspec URL: files are then cached under data_cfg.cache_dir (shard_cache.py)."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    opened = []
    for i, spec in enumerate(data_cfg.sources):
        folder = source_folder(out_dir, spec.name)
        source = ShardedSource(folder, spec.name, cache_dir=getattr(data_cfg, "cache_dir", "") or None,
                               prefetch_shards=getattr(data_cfg, "prefetch_shards", 2))
        found = source.manifest.get("tokenizer_fingerprint")
        if found != fingerprint:
            raise PreparedDataError(
                f"source {spec.name!r} was prepared with tokenizer {found}, but this tokenizer is {fingerprint}; "
                "re-run prepare with this tokenizer", file=f"{folder}/{MANIFEST}", field="tokenizer_fingerprint",
                reason="tokenizer_mismatch")
        wanted = prepared_settings(spec, data_cfg, tokenizer)
        stored = source.manifest.get("settings", {})
        for key, value in wanted.items():
            if stored.get(key) != value:
                raise PreparedDataError(
                    f"source {spec.name!r} was prepared with {key}={stored.get(key)!r}, the config asks for {value!r}; "
                    "re-run prepare", file=f"{folder}/{MANIFEST}", field=f"data.sources[{i}] / settings.{key}",
                    reason="settings_mismatch")
        opened.append(source)
    return opened
