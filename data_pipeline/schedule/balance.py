"""Deal a global batch's rows to the ranks' micro-batches so that their token counts are even.

Every rank runs one micro-batch per accumulation step, and the gradient reduction after each
backward waits for the slowest rank. Rows in schedule order leave that to chance: four unpacked
alpaca-like samples per micro-batch differ by ~30% in tokens between ranks, and the fast rank idles.
`balanced_rows` keeps the global batch's rows (the same samples, so the same loss and gradients:
the loss is the global token mean whatever the split) and only reorders them: longest first, each
row goes to the micro-batch slot with the fewest tokens that still has room (LPT scheduling),
ties to the lowest slot. Slot (rank r, accumulation step j) is rows [r*R + j*mb, r*R + (j+1)*mb)
of the result, R = rows per rank, as the stream reads them. Deterministic: it depends on the row
lengths and the geometry only, so every rank computes the same order.
"""

from __future__ import annotations

import heapq
from typing import Sequence


def balanced_rows(rows: Sequence[tuple[int, ...]], tokens: Sequence[int], ranks: int, accum: int,
                  micro_batch_size: int) -> tuple[tuple[int, ...], ...]:
    """`rows` (ranks * accum * micro_batch_size of them) reordered into even micro-batches."""
    slots = ranks * accum
    if len(rows) != slots * micro_batch_size:
        raise ValueError(f"balanced_rows: {len(rows)} rows for {ranks} ranks x {accum} steps x {micro_batch_size}")
    filled: list[list[int]] = [[] for _ in range(slots)]
    heap = [(0, s) for s in range(slots)]  # (tokens so far, slot): the lightest slot with room on top
    for i in sorted(range(len(rows)), key=lambda i: (-tokens[i], i)):
        load, slot = heapq.heappop(heap)
        filled[slot].append(i)
        if len(filled[slot]) < micro_batch_size:
            heapq.heappush(heap, (load + tokens[i], slot))
    # slot order: accumulation step j's slots side by side across ranks are the j-th lightest ones,
    # so that the ranks meeting at one reduction carry alike loads
    order = sorted(range(slots), key=lambda s: (-sum(tokens[i] for i in filled[s]), s))
    out: list[tuple[int, ...]] = [()] * len(rows)
    for k, slot in enumerate(order):
        step, rank = divmod(k, ranks)
        base = rank * accum * micro_batch_size + step * micro_batch_size
        for j, i in enumerate(sorted(filled[slot])):
            out[base + j] = rows[i]
    return tuple(out)
