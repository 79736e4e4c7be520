"""The global mixture schedule: a deterministic sequence of (source, sample) for a whole run.

Inputs are only (seed, source sizes, integer source quotas, block size); world size and worker
count never enter, so a sample's global position is the same on any cluster (DESIGN invariant 4).

Exact ratios. The sequence is cut into blocks of `block_size` positions. After k blocks, source s
has been drawn C_s(k) times, where C_s(k) is the largest-remainder (Hamilton) apportionment of the
k * block_size seats by the integer quotas q_s:

    C_s(k) = floor(k*B*q_s / Q) + (1 if s is among the r(k) largest remainders else 0)

Carrying the largest remainder from block to block is algebraically the same thing, so every
prefix of whole blocks is within 1 of its exact share, and a block's composition is
C_s(k+1) - C_s(k), computed in O(S log S) with exact integer arithmetic (no float drift at
position 10^12). Hamilton counts are non-decreasing in k when every source has at least one seat
per block (B*q_s >= Q), or when there are only two sources; otherwise the block is widened to the
smallest multiple of the global batch that gives every source a seat, and exactness then holds per
widened block (see `mixture_block_size`).

Within-source order: the m-th draw of source s is sample perm_{seed,s,pass}(m mod n_s) with
pass = m // n_s, a keyed Feistel permutation per pass: each pass visits every sample exactly once,
in a fresh order. Within a block the slots are shuffled by another keyed permutation, so sources
interleave instead of arriving in runs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Sequence

from data_pipeline.schedule.permutation import FeistelPermutation, derive_key

_MAX_CACHED_PASSES = 256
"""Pass permutations kept alive (a few words each); consecutive lookups mostly share passes."""

SCHEDULE_VERSION = 1
"""Bump when the mapping position -> sample changes, so old checkpoints refuse to resume."""


def mixture_block_size(global_batch_size: int, quotas: Sequence[int]) -> int:
    """The schedule block: the global batch, widened only when Hamilton counts could shrink.

    With three or more drawn sources and one of them owed less than one seat per block, a block's
    count for it could come out as -1 (the Alabama paradox); widening the block to give every drawn
    source >= 1 seat rules that out."""
    if global_batch_size < 1:
        raise ValueError(f"train.global_batch_size: must be >= 1, got {global_batch_size}")
    drawn = [q for q in quotas if q > 0]
    total = sum(drawn)
    if not drawn:
        raise ValueError("mixture: every source has a quota of 0; nothing to draw")
    if len(drawn) <= 2 or global_batch_size * min(drawn) >= total:
        return global_batch_size
    return global_batch_size * math.ceil(total / (global_batch_size * min(drawn)))


def hamilton_counts(seats: int, quotas: Sequence[int]) -> list[int]:
    """Largest-remainder apportionment of `seats` by integer `quotas` (ties: lower index first)."""
    total = sum(quotas)
    floors, remainders = zip(*(divmod(seats * q, total) for q in quotas))
    leftover = seats - sum(floors)
    order = sorted(range(len(quotas)), key=lambda s: (-remainders[s], s))
    counts = list(floors)
    for s in order[:leftover]:
        counts[s] += 1
    return counts


@dataclass(frozen=True)
class Block:
    """One schedule block: where it starts and how many draws each source had before/within it."""

    index: int
    start: int
    drawn_before: tuple[int, ...]
    counts: tuple[int, ...]


class MixtureSchedule:
    """position -> (source index, sample index), O(1) time and memory per lookup."""

    def __init__(self, sizes: Sequence[int], quotas: Sequence[int], global_batch_size: int, seed: int):
        if len(sizes) != len(quotas) or not sizes:
            raise ValueError(f"mixture: {len(sizes)} source sizes but {len(quotas)} quotas")
        for s, (n, q) in enumerate(zip(sizes, quotas)):
            if q < 0:
                raise ValueError(f"mixture: source {s} has a negative quota {q}")
            if q > 0 and n < 1:
                raise ValueError(f"mixture: source {s} is empty but has a quota of {q} samples")
        self.sizes = tuple(int(n) for n in sizes)
        self.quotas = tuple(int(q) for q in quotas)
        self.seed = int(seed)
        self.block_size = mixture_block_size(global_batch_size, self.quotas)
        self._cached_block: Block | None = None
        self._cached_block_perm: tuple[int, FeistelPermutation] | None = None
        self._pass_perms: dict[tuple[int, int], FeistelPermutation] = {}

    @property
    def fingerprint(self) -> str:
        """Hash of everything that decides the order; a checkpoint stores it to refuse a changed run."""
        inputs = [SCHEDULE_VERSION, self.sizes, self.quotas, self.block_size, self.seed]
        return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]

    def block(self, index: int) -> Block:
        """Composition of block `index` (cached: consecutive lookups usually share a block)."""
        cached = self._cached_block
        if cached is not None and cached.index == index:
            return cached
        before = hamilton_counts(index * self.block_size, self.quotas)
        after = hamilton_counts((index + 1) * self.block_size, self.quotas)
        counts = tuple(a - b for a, b in zip(after, before))
        if min(counts) < 0:  # unreachable by mixture_block_size's construction; guard the invariant
            raise RuntimeError(f"mixture: block {index} has negative counts {counts}")
        block = Block(index, index * self.block_size, tuple(before), counts)
        self._cached_block = block
        return block

    def source_of_slot(self, block: Block, slot: int) -> tuple[int, int]:
        """(source, draw number within that source) for a slot of the shuffled block."""
        shuffled = self._block_permutation(block.index)(slot)
        for source, count in enumerate(block.counts):
            if shuffled < count:
                return source, block.drawn_before[source] + shuffled
            shuffled -= count
        raise AssertionError("block counts do not sum to the block size")  # unreachable

    def sample_of_draw(self, source: int, draw: int) -> int:
        """The sample index of the `draw`-th draw from `source`: pass-wise Feistel permutation."""
        n = self.sizes[source]
        pass_index, offset = divmod(draw, n)
        perm = self._pass_perms.get((source, pass_index))
        if perm is None:
            if len(self._pass_perms) >= _MAX_CACHED_PASSES:  # bounded: memory stays O(1)
                self._pass_perms.clear()
            perm = FeistelPermutation(n, derive_key(self.seed, "source", source, pass_index))
            self._pass_perms[(source, pass_index)] = perm
        return perm(offset)

    def _block_permutation(self, block_index: int) -> FeistelPermutation:
        cached = self._cached_block_perm
        if cached is None or cached[0] != block_index:
            cached = (block_index, FeistelPermutation(self.block_size, derive_key(self.seed, "block", block_index)))
            self._cached_block_perm = cached
        return cached[1]

    def __getitem__(self, position: int) -> tuple[int, int]:
        if position < 0:
            raise IndexError(f"mixture: position {position} < 0")
        block_index, slot = divmod(position, self.block_size)
        source, draw = self.source_of_slot(self.block(block_index), slot)
        return source, self.sample_of_draw(source, draw)

    def draws_before(self, position: int) -> list[int]:
        """How many times each source was drawn in positions [0, position), in O(block) time."""
        block_index, slot = divmod(position, self.block_size)
        block = self.block(block_index)
        drawn = list(block.drawn_before)
        for s in range(slot):
            drawn[self.source_of_slot(block, s)[0]] += 1
        return drawn
