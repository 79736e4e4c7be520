"""Exact deduplication of a prepared source: a view holding the first occurrence of each sample.

Two samples are the same when their fingerprints (fingerprint.py: tokens and loss mask) are equal.
The view keeps the first occurrence of each, in original order, so the result depends only on the
prepared data, never on the world size or the seed. It is applied before the held-out split, so a
duplicate can never sit on both sides of it. Memory: one int64 index per kept sample.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from data_pipeline.spec import DataConfigError, SampleSource
from data_pipeline.split import IndexedView


def first_occurrences(fingerprints: np.ndarray) -> np.ndarray:
    """Sorted indices of the first sample of each distinct fingerprint."""
    _, first = np.unique(np.asarray(fingerprints), return_index=True)
    return np.sort(first).astype(np.int64)


class DeduplicatedView(IndexedView):
    """The first occurrence of every distinct sample of a source, in original order."""

    def __init__(self, parent: SampleSource, kept: np.ndarray) -> None:
        super().__init__(parent, parent.name, np.asarray(parent.lengths)[kept])
        self._kept = kept

    def original_index(self, index: int) -> int:
        return int(self._kept[index])

    @property
    def fingerprints(self) -> Optional[np.ndarray]:
        parent = self._parent_fingerprints()
        return None if parent is None else parent[self._kept]


def deduplicate(source: SampleSource, key: str) -> tuple[SampleSource, int]:
    """(the source without exact duplicates, how many were dropped); the source itself when none."""
    fingerprints = getattr(source, "fingerprints", None)
    if fingerprints is None:
        raise DataConfigError(f"{key}: source {source.name!r} has no sample fingerprints; re-run prepare")
    kept = first_occurrences(fingerprints)
    dropped = len(source) - len(kept)
    return (source, 0) if dropped == 0 else (DeduplicatedView(source, kept), dropped)
