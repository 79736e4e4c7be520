"""data.dedup=exact: first occurrences only, before the held-out split, the same on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.selection.dedup import deduplicate, first_occurrences
from data_pipeline.store.fingerprint import eval_overlap_warnings
from data_pipeline.prepare import prepare_sources
from data_pipeline.spec import DataConfig, DataConfigError, SourceSpec
from data_pipeline.selection.split import SelectedView, split_source


def _write(path: Path, indices) -> Path:
    records = [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}"} for i in indices]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def test_first_occurrences_keep_order():
    fingerprints = np.array([7, 3, 7, 5, 3, 9], dtype=np.uint64)
    assert first_occurrences(fingerprints).tolist() == [0, 1, 3, 5]
    assert first_occurrences(np.zeros(0, dtype=np.uint64)).tolist() == []


def test_deduplicated_source_then_split_has_no_overlap(tiny_tokenizer, tmp_path):
    order = [0, 1, 2, 0, 3, 1, 4, 5, 0, 6, 7, 8, 9, 2, 10, 11]  # 12 distinct, 4 repeats
    spec = SourceSpec(name="dup", path=str(_write(tmp_path / "d.jsonl", order)), eval_count=3)
    (source,) = prepare_sources(DataConfig(sources=[spec], template="chatml"), tiny_tokenizer, tmp_path / "out",
                                show_progress=False)
    view, dropped = deduplicate(source, "data.sources[0]")
    assert isinstance(view, SelectedView) and dropped == 4 and len(view) == 12
    first = [order.index(i) for i in range(12)]
    assert [view.original_index(j) for j in range(12)] == sorted(first)
    for j in range(12):
        ids, labels = view.get(j)
        assert np.array_equal(ids, source.get(view.original_index(j))[0])
        assert view.lengths[j] == source.lengths[view.original_index(j)]
    assert len(np.unique(view.fingerprints)) == 12
    training, held_out = split_source(view, spec)
    assert len(training) == 9 and len(held_out) == 3
    assert eval_overlap_warnings([training], [("dup", held_out)]) == []


def test_a_source_without_duplicates_is_returned_as_is(tiny_tokenizer, tmp_path):
    spec = SourceSpec(name="clean", path=str(_write(tmp_path / "c.jsonl", range(5))))
    (source,) = prepare_sources(DataConfig(sources=[spec], template="chatml"), tiny_tokenizer, tmp_path / "out",
                                show_progress=False)
    assert deduplicate(source, "data.sources[0]") == (source, 0)


def test_a_source_without_fingerprints_is_an_error_naming_the_key():
    class Bare:
        name = "bare"
        lengths = np.array([3, 4])

        def __len__(self):
            return 2

    with pytest.raises(DataConfigError, match=r"data.sources\[2\]: source 'bare' has no sample fingerprints"):
        deduplicate(Bare(), "data.sources[2]")


def test_dedup_setting_is_validated():
    cfg = DataConfig(sources=[SourceSpec(name="a", path="a.jsonl")], dedup="fuzzy")
    with pytest.raises(DataConfigError, match=r"data.dedup: 'fuzzy'"):
        cfg.validate()


def test_trainer_applies_dedup_only_when_asked_and_says_what_it_dropped(tiny_tokenizer, tmp_path, capsys):
    from engine.trainer import Ranks, deduplicated

    spec = SourceSpec(name="dup", path=str(_write(tmp_path / "d.jsonl", [0, 1, 0, 2])))
    (source,) = prepare_sources(DataConfig(sources=[spec], template="chatml"), tiny_tokenizer, tmp_path / "out",
                                show_progress=False)
    assert deduplicated([source], "none", "data.sources", Ranks(0, 1, 0)) == [source]
    (view,) = deduplicated([source], "exact", "data.sources", Ranks(0, 2, 0))
    assert len(view) == 3
    assert "dedup: dup: 1 exact duplicates dropped, 3 of 4 samples kept" in capsys.readouterr().out
    (quiet,) = deduplicated([source], "exact", "data.sources", Ranks(1, 2, 1))  # same view, no second message
    assert len(quiet) == 3 and capsys.readouterr().out == ""
