"""Shard writer/reader round trip: bit-packed masks at arbitrary offsets, dtypes, index."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.errors import PreparedDataError
from data_pipeline.store.shards import FORMAT_VERSION, ShardedSource, ShardWriter, token_dtype, write_index, write_manifest


def build(folder, samples_per_shard: list[list[tuple[np.ndarray, np.ndarray]]], dtype) -> ShardedSource:
    shards, lengths, start = [], [], 0
    for sid, samples in enumerate(samples_per_shard):
        w = ShardWriter(folder, sid, dtype)
        for ids, mask in samples:
            w.add(ids, mask)
        lengths.append(w.lengths())
        tokens = w.close()
        shards.append({"id": sid, "token_start": start, "tokens": tokens, "samples": len(samples)})
        start += tokens
    all_lengths = np.concatenate(lengths)
    write_index(folder, all_lengths, np.arange(len(all_lengths), dtype=np.uint64))
    write_manifest(folder, {"format_version": FORMAT_VERSION, "source": "s", "token_dtype": np.dtype(dtype).str,
                            "shards": shards, "counts": {"samples": int(len(all_lengths))}})
    return ShardedSource(folder)


@pytest.mark.parametrize("vocab", [6400, 70000])
def test_round_trip_across_shards(tmp_path, vocab):
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, vocab, n), rng.random(n) < 0.5) for n in rng.integers(1, 40, size=50)]
    source = build(tmp_path, [samples[:17], samples[17:18], samples[18:]], token_dtype(vocab))
    assert token_dtype(vocab) == (np.uint16 if vocab <= 65535 else np.uint32)
    assert len(source) == 50 and source.lengths.tolist() == [len(s[0]) for s in samples]
    for i, (ids, mask) in enumerate(samples):
        got_ids, labels = source.get(i)
        assert got_ids.tolist() == ids.tolist()
        assert labels.tolist() == np.where(mask, ids, -100).tolist()


def test_incomplete_folder_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "complete": false}')
    with pytest.raises(PreparedDataError, match="manifest"):
        ShardedSource(tmp_path)


def test_index_out_of_range(tmp_path):
    source = build(tmp_path, [[(np.arange(3), np.ones(3, bool))]], np.uint16)
    with pytest.raises(IndexError):
        source.get(1)
