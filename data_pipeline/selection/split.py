"""A deterministic held-out split of one source: an evaluation view and the training view of the rest.

Which samples are held out depends only on (source name, source size, held-out count): the first k
outputs of a keyed Feistel permutation of [0, n). Never on the mixture seed, world size or run
length, so two runs of one dataset evaluate on the same samples and can be compared, and a resumed
run holds out exactly what it held out before.

The training view renumbers the kept samples 0..n-k-1 in their original order: the mixture and the
stream see an ordinary source and can never draw a held-out sample, because no index maps to one.
Memory: the sorted held-out indices (k ints) plus the kept samples' lengths (one int32 per sample,
which the stream reads as an array); nothing is allocated when no split is configured.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.schedule.permutation import FeistelPermutation, derive_key
from data_pipeline.spec import DataConfigError, SampleSource, SourceSpec

HELD_OUT_PURPOSE = "held_out"


class HeldOutError(DataConfigError, DataError):
    """eval_count / eval_fraction hold out a whole source. A config error (it names the key), and a
    data error too: whether it happens depends on how many samples the data kept, so it surfaces
    where data errors are reported (prepare, the trainer's data setup)."""

    reason = "held_out_too_large"


def held_out_count(spec: SourceSpec, size: int, key: str = "data.sources") -> int:
    """How many samples of a source of `size` samples are held out (eval_count or eval_fraction)."""
    if spec.eval_count is not None:
        k, setting = int(spec.eval_count), "eval_count"
    elif spec.eval_fraction > 0:
        k, setting = max(1, round(spec.eval_fraction * size)), "eval_fraction"  # a requested split is never empty
    else:
        return 0
    if k >= size:
        raise HeldOutError(
            f"{key}.{setting}: holding out {k} of the {size} samples of source {spec.name!r} leaves nothing to "
            f"train on; lower {setting} (the source has {size} samples)")
    return k


def held_out_indices(name: str, size: int, count: int) -> np.ndarray:
    """Sorted original indices of the held-out samples (int64 [count])."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    perm = FeistelPermutation(size, derive_key(HELD_OUT_PURPOSE, name))
    return np.sort(np.fromiter((perm(i) for i in range(count)), dtype=np.int64, count=count))


class IndexedView:
    """A SampleSource made of some samples of another, addressed 0..len-1.

    `original_index(j)` maps a view index to the parent's index: the one place that knows the
    numbering, so sample-id logs and tests can translate back."""

    def __init__(self, parent: SampleSource, name: str, lengths: np.ndarray) -> None:
        self.parent = parent
        self.name = name
        self._lengths = lengths

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def original_index(self, index: int) -> int:
        raise NotImplementedError

    def _parent_fingerprints(self) -> Optional[np.ndarray]:
        fingerprints = getattr(self.parent, "fingerprints", None)
        return None if fingerprints is None else np.asarray(fingerprints)

    def get(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {self.name!r} with {len(self)} samples")
        return self.parent.get(self.original_index(index))


class SelectedView(IndexedView):
    """Chosen samples of a source, in original order: the held-out ones of a split, or the first
    occurrences kept by deduplication (dedup.py)."""

    def __init__(self, parent: SampleSource, selected: np.ndarray, name: Optional[str] = None) -> None:
        super().__init__(parent, name or parent.name, np.asarray(parent.lengths)[selected])
        self._selected = selected

    def original_index(self, index: int) -> int:
        return int(self._selected[index])

    @property
    def fingerprints(self) -> Optional[np.ndarray]:
        parent = self._parent_fingerprints()
        return None if parent is None else parent[self._selected]


class TrainingView(IndexedView):
    """Every sample of a source except the held-out ones, in original order.

    The j-th kept sample is x = j + #{h in held_out : h <= x}. With g[i] = held_out[i] - i (the
    number of kept samples before the i-th held-out one, non-decreasing), that count is the number
    of g values <= j: one binary search, O(log k) per lookup, no index array of size n."""

    def __init__(self, parent: SampleSource, held_out: np.ndarray) -> None:
        lengths = np.delete(np.asarray(parent.lengths), held_out) if len(held_out) else parent.lengths
        super().__init__(parent, parent.name, lengths)
        self._held_out = held_out
        self._kept_before_gap = held_out - np.arange(len(held_out), dtype=np.int64)

    @property
    def fingerprints(self) -> Optional[np.ndarray]:
        parent = self._parent_fingerprints()
        return None if parent is None else np.delete(parent, self._held_out)

    def original_index(self, index: int) -> int:
        return index + int(np.searchsorted(self._kept_before_gap, index, side="right"))


def split_source(parent: SampleSource, spec: SourceSpec, key: str = "data.sources") -> tuple[SampleSource, Optional[SelectedView]]:
    """(training view, held-out view or None). Without a split the parent itself trains."""
    count = held_out_count(spec, len(parent), key)
    if count == 0:
        return parent, None
    held_out = held_out_indices(spec.name, len(parent), count)
    return TrainingView(parent, held_out), SelectedView(parent, held_out)
