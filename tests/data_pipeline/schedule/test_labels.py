"""The label contract (data_pipeline/schedule/labels.py): one ignore value for every room, a sample's first
token never trains, and the data side's count equals the count the loss divides by."""

from __future__ import annotations

import numpy as np

from data_pipeline.schedule import accounting, collate
from data_pipeline.store import shards
from data_pipeline.schedule.collate import LoadedSample, collate_rows
from data_pipeline.schedule.labels import IGNORE_INDEX, count_targets, sample_labels, shift_labels


def test_every_room_uses_the_one_ignore_index():
    assert shards.IGNORE_INDEX is collate.IGNORE_INDEX is accounting.IGNORE_INDEX is IGNORE_INDEX


def test_first_token_rule_leaves_the_stored_labels_alone():
    stored = np.array([5, 6, -100, 8])
    assert sample_labels(stored).tolist() == [-100, 6, -100, 8]
    assert stored.tolist() == [5, 6, -100, 8]


def test_count_before_the_shift_equals_the_count_after_it_in_packed_rows():
    a = LoadedSample(0, 0, np.arange(3, 9), np.array([3, 4, -100, 6, 7, 8]))  # its first token is a label
    b = LoadedSample(1, 0, np.arange(9, 13), np.array([9, -100, 11, 12]))
    batch = collate_rows([[a, b]], 12, pad_id=0)
    trained_before_shift = int((batch.labels != IGNORE_INDEX).sum())
    assert trained_before_shift == count_targets(batch.labels) == int((shift_labels(batch.labels) != IGNORE_INDEX).sum())
    assert accounting.source_counts([batch], 2)["response_tokens"] == [4, 2]
    # the last token of sample a (position 5) does not learn to predict b's first token
    assert shift_labels(batch.labels)[0, 5] == IGNORE_INDEX
