"""In-memory SampleSource fakes (data_pipeline.spec.SampleSource) for stream/mixture/packing tests."""

from __future__ import annotations

import numpy as np

from data_pipeline.spec import SourceSpec

VOCAB = 300


class FakeSource:
    """Sample i has lengths[i] tokens drawn from a generator keyed by (source_id, i); its first
    half is prompt (label -100), the rest trains. Counts get() calls to check what a rank reads."""

    def __init__(self, name: str, lengths, source_id: int = 0) -> None:
        self.name = name
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self.source_id = source_id
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def get(self, index: int):
        self.reads.append(index)
        n = int(self._lengths[index])
        rng = np.random.default_rng([self.source_id, index])
        input_ids = rng.integers(3, VOCAB, n, dtype=np.int64)
        labels = input_ids.copy()
        labels[: n // 2] = -100
        return input_ids, labels


def fake_sources(sizes, max_len: int = 40, min_len: int = 2, seed: int = 0):
    """Sources with random lengths in [min_len, max_len] and matching proportion-less specs."""
    rng = np.random.default_rng(seed)
    sources = [FakeSource(f"src{i}", rng.integers(min_len, max_len + 1, n), source_id=i) for i, n in enumerate(sizes)]
    specs = [SourceSpec(name=s.name, path=f"mem://{s.name}") for s in sources]
    return sources, specs
