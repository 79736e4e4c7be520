"""Deterministic packing of the global sample stream into one global batch of fixed-length rows.

Scheme: first-fit over all rows of the global batch, taking samples in schedule order, and closing
the batch at the first sample that fits in no row (that sample opens the next batch). So a global
batch always consumes a contiguous run [start, end) of schedule positions: the resume state is the
single integer `end`, and the packing depends only on the schedule and the sample lengths, never
on world size (packing happens before rows are dealt to ranks).

First-fit is found in O(log rows) per sample with a max-segment-tree over the rows' free space;
all rows stay open until the batch closes, so short samples keep filling the gaps that long ones
leave.

Evaluation packs differently (`pack_next_fit`): each rank packs its own share of a set in order,
because an eval set is read once and needs no schedule, no resume position and no global layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence


class SampleTooLongError(ValueError):
    """A sample is longer than the packing length; prepare should have truncated it."""


@dataclass(frozen=True)
class PackedBatch:
    """rows[r] = schedule positions packed into row r, in order; [start, end) were consumed."""

    start: int
    end: int
    rows: tuple[tuple[int, ...], ...]


class _FreeSpaceTree:
    """Max-segment-tree over the free space of `rows` rows: leftmost row with >= need tokens free."""

    def __init__(self, rows: int, capacity: int) -> None:
        self.leaves = 1 << max(0, (rows - 1).bit_length())
        self.free = [0] * (2 * self.leaves)
        for r in range(rows):
            self.free[self.leaves + r] = capacity
        for node in range(self.leaves - 1, 0, -1):
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])

    def first_fit(self, need: int) -> int:
        """Leftmost row with at least `need` free tokens, or -1."""
        if self.free[1] < need:
            return -1
        node = 1
        while node < self.leaves:
            node = 2 * node if self.free[2 * node] >= need else 2 * node + 1
        return node - self.leaves

    def take(self, row: int, tokens: int) -> None:
        node = self.leaves + row
        self.free[node] -= tokens
        node //= 2
        while node:
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])
            node //= 2


def pack_global_batch(start: int, length_at: Callable[[int], int], rows: int, seq_len: int) -> PackedBatch:
    """Pack schedule positions start, start+1, ... into `rows` rows of `seq_len` tokens.

    `length_at(position)` gives the token count of the sample at a schedule position."""
    tree = _FreeSpaceTree(rows, seq_len)
    packed: list[list[int]] = [[] for _ in range(rows)]
    position = start
    while True:
        length = length_at(position)
        if length < 1:
            raise ValueError(f"schedule position {position}: sample has {length} tokens; sources must not hold empty samples")
        if length > seq_len:
            raise SampleTooLongError(
                f"schedule position {position}: sample has {length} tokens; data.seq_len is {seq_len} "
                "(prepare truncates to data.seq_len: were the shards prepared with a larger one?)"
            )
        row = tree.first_fit(length)
        if row < 0:
            break
        tree.take(row, length)
        packed[row].append(position)
        position += 1
    return PackedBatch(start, position, tuple(tuple(r) for r in packed))


def pack_next_fit(indices: Iterable[int], lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """`indices` in order, packed into rows of <= seq_len tokens by next-fit (a sample that does
    not fit closes the row). Packing changes no loss (tests/data_pipeline/test_packing.py)."""
    rows: list[list[int]] = []
    used = seq_len  # forces a new row for the first sample
    for index in indices:
        n = int(lengths[index])
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += n
    return rows
