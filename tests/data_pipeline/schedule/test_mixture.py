"""Invariants of the mixture schedule: passes are permutations, ratios are exact per block,
lookups are O(1) at any position, and the quotas follow repeat/choose/proportion."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from data_pipeline.schedule.mixture import MixtureSchedule, hamilton_counts
from data_pipeline.schedule.permutation import FeistelPermutation, derive_key
from data_pipeline.schedule.run_length import source_quotas, total_samples_for
from data_pipeline.spec import DataConfigError, SourceSpec


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 1000])
def test_feistel_is_a_bijection(n):
    perm = FeistelPermutation(n, derive_key(7, "t", n))
    assert sorted(perm(i) for i in range(n)) == list(range(n))


def test_feistel_keys_give_different_orders():
    a = [FeistelPermutation(100, derive_key(1, "x"))(i) for i in range(100)]
    b = [FeistelPermutation(100, derive_key(2, "x"))(i) for i in range(100)]
    assert a != b and a != list(range(100))


def _block_counts(schedule: MixtureSchedule, block: int) -> Counter:
    start = block * schedule.block_size
    return Counter(schedule[p][0] for p in range(start, start + schedule.block_size))


def test_each_sample_exactly_once_per_pass():
    """Pass p of a source (its draws p*n .. p*n+n-1) is a permutation, freshly shuffled per pass.

    Within one block the draws are shuffled together, so at a pass boundary two passes may
    interleave in position order; what holds for every whole-block prefix is that each sample
    has been drawn floor(D/n) or ceil(D/n) times, D being the source's draws so far."""
    sizes = [7, 13, 5]
    schedule = MixtureSchedule(sizes, [1, 2, 1], global_batch_size=8, seed=3)
    for source, n in enumerate(sizes):
        passes = [[schedule.sample_of_draw(source, p * n + i) for i in range(n)] for p in range(3)]
        for order in passes:
            assert sorted(order) == list(range(n))
        assert passes[0] != passes[1], "each pass must be freshly shuffled"
    seen: dict[int, Counter] = {s: Counter() for s in range(3)}
    for block in range(40):
        for position in range(block * 8, (block + 1) * 8):
            source, index = schedule[position]
            seen[source][index] += 1
        drawn = schedule.draws_before((block + 1) * 8)
        for source, n in enumerate(sizes):
            low, high = drawn[source] // n, -(-drawn[source] // n)
            assert sum(seen[source].values()) == drawn[source]
            assert all(low <= seen[source][i] <= high for i in range(n)), (block, source, seen[source])


def test_exact_70_30_in_every_batch():
    specs = [SourceSpec(name="a", path="x", proportion=0.7), SourceSpec(name="b", path="y", proportion=0.3)]
    quotas = source_quotas(specs, [50, 1000], total_samples=10 * 30)
    assert quotas == [210, 90]
    schedule = MixtureSchedule([50, 1000], quotas, global_batch_size=10, seed=0)
    for block in range(30):
        assert _block_counts(schedule, block) == Counter({0: 7, 1: 3})
    first_block = [schedule[p][0] for p in range(10)]
    assert first_block != sorted(first_block), "the order within a batch must be shuffled"


@pytest.mark.parametrize("quotas,gbs", [([1, 2], 4), ([3, 5, 1], 4), ([1, 1, 1, 100], 8), ([13, 7, 29, 2], 5)])
def test_cumulative_counts_within_one_of_share(quotas, gbs):
    schedule = MixtureSchedule([11, 23, 5, 9][: len(quotas)], quotas, global_batch_size=gbs, seed=1)
    seen = Counter()
    total = sum(quotas)
    for block in range(60):
        seen += _block_counts(schedule, block)
        seats = (block + 1) * schedule.block_size
        for s, q in enumerate(quotas):
            assert abs(seen[s] - seats * q / total) < 1, (block, s, seen, seats)


def test_hamilton_counts_sum_and_floor():
    counts = hamilton_counts(10, [1, 1, 1])
    assert sum(counts) == 10 and sorted(counts) == [3, 3, 4]


def test_lookup_is_constant_time_at_huge_positions():
    started = time.perf_counter()
    schedule = MixtureSchedule([10**9, 3 * 10**8, 7], [6 * 10**11, 4 * 10**11 - 5, 5], global_batch_size=1024, seed=9)
    source, index = schedule[10**11]
    elapsed = time.perf_counter() - started
    assert 0 <= index < schedule.sizes[source]
    assert elapsed < 0.5, f"lookup at 1e11 took {elapsed:.3f}s"
    assert schedule[10**11] == (source, index)


def test_quotas_repeat_choose_fix_counts_and_pool_shares_rest():
    specs = [
        SourceSpec(name="rep", path="x", repeat=2.0),
        SourceSpec(name="cho", path="x", choose=30),
        SourceSpec(name="p1", path="x", proportion=1.0),
        SourceSpec(name="p3", path="x", proportion=3.0),
    ]
    quotas = source_quotas(specs, [10, 100, 50, 50], total_samples=250)
    assert quotas == [20, 30, 50, 150]


def test_quotas_default_to_size_and_mixed_pool():
    natural = [SourceSpec(name="a", path="x"), SourceSpec(name="b", path="x")]
    assert source_quotas(natural, [100, 300], total_samples=40) == [10, 30]
    mixed = [SourceSpec(name="a", path="x", proportion=0.5), SourceSpec(name="b", path="x"), SourceSpec(name="c", path="x")]
    assert source_quotas(mixed, [10, 100, 300], total_samples=80) == [40, 10, 30]


def test_quotas_refuse_fixed_counts_larger_than_run():
    specs = [SourceSpec(name="rep", path="x", repeat=3.0), SourceSpec(name="p", path="x", proportion=1.0)]
    with pytest.raises(DataConfigError, match="train.total_steps"):
        source_quotas(specs, [100, 10], total_samples=200)


def test_total_samples_for_epochs_of_a_pool_source():
    specs = [SourceSpec(name="fix", path="x", choose=40), SourceSpec(name="a", path="x", proportion=1.0), SourceSpec(name="b", path="x", proportion=3.0)]
    total = total_samples_for(specs, [10, 20, 1000], epochs_of="a", epochs=2.0)
    assert total == 40 + 160
    assert source_quotas(specs, [10, 20, 1000], total)[1] == 40  # two passes over "a"
