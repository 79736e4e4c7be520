"""Prepared sources at an fsspec URL: cached locally on first use, prefetched, verified, memory-mapped."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

import data_pipeline.prepare as prepare_mod
from data_pipeline.errors import PreparedDataError
from data_pipeline.prepare import prepare_sources
from data_pipeline.store.shards import open_prepared
from data_pipeline.spec import DataConfig, SourceSpec


@pytest.fixture
def prepared(tiny_tokenizer, tmp_path, monkeypatch):
    """A local prepared source of 4 shards and its config."""
    monkeypatch.setattr(prepare_mod, "CHUNK_RECORDS", 16)
    src = tmp_path / "a.jsonl"
    records = [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}"} for i in range(60)]
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    cfg = DataConfig(sources=[SourceSpec(name="a", path=str(src))], template="chatml", num_proc=1)
    (local,) = prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    assert len(local.manifest["shards"]) == 4
    return cfg, tmp_path / "out"


@pytest.fixture
def memory_copy(prepared):
    """The prepared folder uploaded to fsspec's memory:// store (removed afterwards)."""
    _, out = prepared
    fs = fsspec.filesystem("memory")
    root = f"/bucket-{uuid.uuid4().hex[:8]}"
    fs.put(str(out / "a"), f"{root}/prep/a", recursive=True)
    yield fs, f"memory://{root}/prep"
    fs.rm(root, recursive=True)


def _all_samples(source) -> list:
    return [np.concatenate(source.get(i)).tolist() for i in range(len(source))]


def test_remote_source_reads_like_local_and_copies_on_demand(prepared, memory_copy, tiny_tokenizer, tmp_path):
    cfg, out = prepared
    fs, url = memory_copy
    cfg.cache_dir, cfg.prefetch_shards = str(tmp_path / "cache"), 1
    (remote,) = open_prepared(cfg, tiny_tokenizer, url)
    assert sorted(remote.cache.copied) == ["lengths.npy", "offsets.npy"]  # opening copies no shard
    remote.get(0)
    remote.cache.wait_idle()
    assert remote.cache.copied[2:4] == ["tokens-00000.bin", "mask-00000.bin"]
    assert sorted(remote.cache.copied[4:]) == ["mask-00001.bin", "tokens-00001.bin"]  # prefetched, one ahead
    (local,) = open_prepared(cfg, tiny_tokenizer, out)
    assert _all_samples(remote) == _all_samples(local)
    assert isinstance(remote._maps[0][0], np.memmap) and Path(remote._maps[0][0].filename).is_relative_to(tmp_path)
    remote.cache.close()
    (again,) = open_prepared(cfg, tiny_tokenizer, url)  # a second open reuses the verified copies
    again.get(59)
    again.cache.wait_idle()
    assert again.cache.copied == []
    again.cache.close()


def test_corrupt_remote_shard_is_refused(prepared, memory_copy, tiny_tokenizer, tmp_path):
    cfg, _ = prepared
    fs, url = memory_copy
    path = url[len("memory://"):] + "/a/tokens-00002.bin"
    data = bytearray(fs.cat(path))
    data[0] ^= 1  # same size, different content
    fs.pipe(path, bytes(data))
    cfg.cache_dir, cfg.prefetch_shards = str(tmp_path / "cache"), 0
    (remote,) = open_prepared(cfg, tiny_tokenizer, url)
    remote.get(0)
    with pytest.raises(PreparedDataError) as err:
        remote.get(40)  # sample 40 lives in shard 2
    assert err.value.reason == "corrupt_prepared" and "tokens-00002.bin" in str(err.value)
    assert not any(p.name.endswith(".part") for p in (tmp_path / "cache").rglob("*"))


def test_file_url(prepared, tiny_tokenizer, tmp_path):
    cfg, out = prepared
    cfg.cache_dir = str(tmp_path / "cache")
    (remote,) = open_prepared(cfg, tiny_tokenizer, f"file://{out}")
    (local,) = open_prepared(cfg, tiny_tokenizer, out)
    assert _all_samples(remote) == _all_samples(local)
    remote.cache.close()


def test_prepare_straight_to_a_url(prepared, tiny_tokenizer, tmp_path):
    cfg, out = prepared
    cfg.cache_dir = str(tmp_path / "cache")
    url = f"memory://bucket-{uuid.uuid4().hex[:8]}/prep"
    fs = fsspec.filesystem("memory")
    try:
        (remote,) = prepare_sources(cfg, tiny_tokenizer, url, show_progress=False)
        assert fs.exists(url[len("memory://"):] + "/a/manifest.json")
        assert not list((tmp_path / "cache" / "staging").iterdir())  # the staging build is gone
        (local,) = open_prepared(cfg, tiny_tokenizer, out)
        assert _all_samples(remote) == _all_samples(local)
        (again,) = prepare_sources(cfg, tiny_tokenizer, url, show_progress=False)  # reused, not rebuilt
        assert again.manifest == remote.manifest
    finally:
        fs.rm(url[len("memory://"):].split("/")[0], recursive=True)
