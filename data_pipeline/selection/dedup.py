"""Exact deduplication of a prepared source: a view holding the first occurrence of each sample.

Two samples are the same when their fingerprints (fingerprint.py: tokens and loss mask) are equal.
The view keeps the first occurrence of each, in original order, so the result depends only on the
prepared data, never on the world size or the seed. It is applied before the held-out split, so a
duplicate can never sit on both sides of it. Memory: one int64 index per kept sample.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.spec import DataConfigError, SampleSource
from data_pipeline.selection.split import SelectedView


def first_occurrences(fingerprints: np.ndarray) -> np.ndarray:
    """Sorted indices of the first sample of each distinct fingerprint."""
    _, first = np.unique(np.asarray(fingerprints), return_index=True)
    return np.sort(first).astype(np.int64)


def deduplicate(source: SampleSource, key: str) -> tuple[SampleSource, int]:
    """(the source without exact duplicates, how many were dropped); the source itself when none."""
    fingerprints = getattr(source, "fingerprints", None)
    if fingerprints is None:
        raise DataConfigError(f"{key}: source {source.name!r} has no sample fingerprints; re-run prepare")
    kept = first_occurrences(fingerprints)
    dropped = len(source) - len(kept)
    return (source, 0) if dropped == 0 else (SelectedView(source, kept), dropped)
