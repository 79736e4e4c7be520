"""Held-out splits: deterministic, disjoint from training, and invisible to the training stream."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.errors import DataError
from data_pipeline.spec import DataConfigError, SourceSpec
from data_pipeline.selection.split import held_out_count, held_out_indices, split_source
from data_pipeline.schedule.stream import SFTStream
from tests.data_pipeline.fake_sources import FakeSource, fake_sources


def test_held_out_is_deterministic_and_depends_on_the_name():
    a = held_out_indices("zh", 1000, 50)
    assert np.array_equal(a, held_out_indices("zh", 1000, 50))
    assert len(set(a.tolist())) == 50 and a.min() >= 0 and a.max() < 1000
    assert not np.array_equal(a, held_out_indices("en", 1000, 50))


def test_views_partition_the_source():
    source = FakeSource("zh", np.arange(1, 101))
    train, held = split_source(source, SourceSpec(name="zh", path="x", eval_fraction=0.1))
    assert len(held) == 10 and len(train) == 90
    originals = [train.original_index(j) for j in range(len(train))] + [held.original_index(j) for j in range(len(held))]
    assert sorted(originals) == list(range(100))
    assert np.array_equal(train.lengths, [source.lengths[train.original_index(j)] for j in range(90)])
    ids, _ = train.get(5)
    assert np.array_equal(ids, source.get(train.original_index(5))[0])


def test_no_split_keeps_the_source():
    source = FakeSource("zh", [3, 4, 5])
    train, held = split_source(source, SourceSpec(name="zh", path="x"))
    assert train is source and held is None


def test_training_stream_never_draws_a_held_out_sample():
    sources, specs = fake_sources([120, 80])
    specs[0].eval_count = 15
    splits = [split_source(s, spec) for s, spec in zip(sources, specs)]
    train = [t for t, _ in splits]
    held = {splits[0][1].original_index(j) for j in range(15)}
    stream = SFTStream(train, specs, seq_len=64, global_batch_size=8, micro_batch_size=4, rank=0, world_size=1,
                       seed=3, packing=True, pad_id=0, total_steps=60)
    drawn = set()
    for _ in range(60):  # several epochs of source 0
        for mb in stream.next_step():
            drawn |= {train[0].original_index(i) for row in mb.sample_ids for s, i in row if s == 0}
    assert not drawn & held
    assert drawn == set(range(120)) - held  # every kept sample trains


@pytest.mark.parametrize("spec, size, message", [
    (SourceSpec(name="a", path="x", eval_count=10), 10, "leaves nothing to train on"),
    (SourceSpec(name="a", path="x", eval_fraction=0.5, eval_count=3), 10, "give one"),
    (SourceSpec(name="a", path="x", eval_count=0), 10, "eval_count: must be >= 1"),
])
def test_bad_split_settings_name_the_key(spec, size, message):
    with pytest.raises(DataConfigError, match=message):
        spec.validate("data.sources[0]")
        held_out_count(spec, size, "data.sources[0]")


def test_tiny_fraction_holds_out_at_least_one():
    assert held_out_count(SourceSpec(name="a", path="x", eval_fraction=0.001), 50) == 1


@pytest.mark.parametrize("spec, setting", [(SourceSpec(name="a", path="x", eval_count=12), "eval_count"),
                                           (SourceSpec(name="a", path="x", eval_fraction=0.99), "eval_fraction")])
def test_a_split_larger_than_the_source_names_the_key_and_the_size(spec, setting):
    """Raised at data setup, after prepare: it must read as a data error (exit 2, no traceback)."""
    with pytest.raises(DataError) as err:
        held_out_count(spec, 10, "data.sources[3]")
    assert isinstance(err.value, DataConfigError)
    assert str(err.value).startswith(f"data.sources[3].{setting}: holding out ")
    assert "the source has 10 samples" in str(err.value) and "'a'" in str(err.value)
