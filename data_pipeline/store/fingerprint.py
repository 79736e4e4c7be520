"""Exact-duplicate detection: a 64-bit fingerprint per prepared sample, and overlap counts.

A sample's fingerprint is a BLAKE2b digest (8 bytes) of its token ids and loss mask, so two
samples share one exactly when they train the model the same way (same rendered text, same
trained tokens; a 1-in-2^64 collision aside). `prepare` stores them beside the shard index
(fingerprints.npy) and reports the duplicates inside each source; `overlap_counts` tells how
many samples of one set (an evaluation set) also occur in another (a training source), the
contamination that makes an eval loss look better than the model is.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


def sample_fingerprint(input_ids: np.ndarray, trained: np.ndarray) -> int:
    """64-bit fingerprint of one sample (ids as int64, so the token dtype does not matter)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.ascontiguousarray(input_ids, dtype=np.int64).tobytes())
    digest.update(np.packbits(np.asarray(trained, dtype=bool)).tobytes())
    digest.update(len(input_ids).to_bytes(8, "little"))  # packbits pads: the length disambiguates
    return int.from_bytes(digest.digest(), "little")


def duplicate_count(fingerprints: np.ndarray) -> int:
    """Samples identical to an earlier sample of the same array."""
    return int(len(fingerprints) - len(np.unique(fingerprints)))


def overlap_counts(queries: np.ndarray, reference: np.ndarray) -> int:
    """How many entries of `queries` occur in `reference`."""
    if len(queries) == 0 or len(reference) == 0:
        return 0
    return int(np.isin(np.asarray(queries), np.unique(np.asarray(reference))).sum())


def eval_overlap_warnings(training: Sequence, evaluated: Sequence[tuple[str, object]]) -> list[str]:
    """One line per (eval set, training source) pair that share samples.

    training: sources (or training views) with .name and .fingerprints; evaluated: (name, source)
    pairs, held-out splits included. Sources without fingerprints (prepared by an older version)
    are left out rather than reported clean.
    """
    lines = []
    for eval_name, eval_source in evaluated:
        queries = getattr(eval_source, "fingerprints", None)
        if queries is None or len(queries) == 0:
            continue
        for source in training:
            reference = getattr(source, "fingerprints", None)
            if reference is None:
                continue
            shared = overlap_counts(queries, reference)
            if shared:
                lines.append(
                    f"eval set {eval_name!r}: {shared} of {len(queries)} samples also occur in training source "
                    f"{source.name!r} (exact duplicates), so its eval loss overstates how well the model generalises"
                )
    return lines
