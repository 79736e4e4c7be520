"""Balanced micro-batches: the global batch's rows, only reordered; every micro-batch slot full;
the heaviest and lightest slots within one row's tokens; the stream trains the same samples per
step with and without it, on any world size, and resumes alike."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.schedule.balance import balanced_rows
from data_pipeline.schedule.stream import SFTStream
from tests.data_pipeline.fake_sources import fake_sources


@pytest.mark.parametrize("ranks,accum,mb", [(1, 1, 4), (2, 2, 4), (4, 1, 2), (3, 2, 1)])
def test_rows_are_only_reordered_and_slots_even(ranks, accum, mb):
    rng = np.random.default_rng(ranks * 10 + mb)
    n = ranks * accum * mb
    rows = tuple((i,) for i in range(n))
    tokens = [int(x) for x in rng.integers(20, 500, n)]
    got = balanced_rows(rows, tokens, ranks, accum, mb)
    assert sorted(got) == sorted(rows)
    assert got == balanced_rows(rows, tokens, ranks, accum, mb)  # deterministic
    weight = dict(zip(rows, tokens))
    per_rank = accum * mb
    loads = [sum(weight[x] for x in got[r * per_rank + j * mb: r * per_rank + (j + 1) * mb])
             for r in range(ranks) for j in range(accum)]
    assert max(loads) - min(loads) <= max(tokens)
    if mb > 1:  # in schedule order the spread is usually far larger: the check can fail
        in_order = [sum(tokens[k * mb:(k + 1) * mb]) for k in range(ranks * accum)]
        assert max(loads) - min(loads) <= max(in_order) - min(in_order)


def test_alpaca_like_lengths_even_out_between_ranks():
    rng = np.random.default_rng(0)
    tokens = [int(x) for x in np.clip(rng.lognormal(5.0, 0.6, 16), 20, 512)]
    rows = tuple((i,) for i in range(16))
    got = balanced_rows(rows, tokens, ranks=2, accum=2, micro_batch_size=4)
    weight = dict(zip(rows, tokens))
    for step in range(2):  # the two ranks meeting at one gradient reduction
        a, b = (sum(weight[x] for x in got[r * 8 + step * 4: r * 8 + step * 4 + 4]) for r in range(2))
        assert abs(a - b) <= 0.1 * max(a, b) + max(tokens) / 4


def test_wrong_row_count_is_an_error():
    with pytest.raises(ValueError, match="7 rows for 2 ranks x 2 steps x 2"):
        balanced_rows(tuple((i,) for i in range(7)), [1] * 7, 2, 2, 2)


def _stream(sources, specs, rank, world, balance, packing):
    return SFTStream(sources, specs, seq_len=64, global_batch_size=8, micro_batch_size=2, rank=rank,
                     world_size=world, seed=5, packing=packing, pad_id=0, total_steps=20, balance=balance)


@pytest.mark.parametrize("packing", [True, False])
def test_the_stream_trains_the_same_samples_per_step_on_any_world_size(packing):
    sources, specs = fake_sources([23, 57, 9])

    def steps(world, balance, n=4):
        streams = [_stream(sources, specs, r, world, balance, packing) for r in range(world)]
        out = []
        for _ in range(n):
            ids = [s for st in streams for mb in st.next_step() for row in mb.sample_ids for s in row]
            out.append(sorted(ids))
        return out, streams[0].state_dict()

    reference, state = steps(1, balance=False)
    for world in (1, 2, 4):
        got, got_state = steps(world, balance=True)
        assert got == reference
        assert got_state["position"] == state["position"]
