"""Exact-duplicate fingerprints: what makes two samples equal, counts in prepare, eval overlap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_pipeline.store.fingerprint import duplicate_count, eval_overlap_warnings, overlap_counts, sample_fingerprint
from data_pipeline.prepare import prepare_sources
from data_pipeline.spec import DataConfig, SourceSpec
from data_pipeline.selection.split import split_source


def test_fingerprint_sees_ids_mask_and_length_but_not_the_token_dtype():
    ids, trained = np.array([5, 6, 7]), np.array([False, True, True])
    base = sample_fingerprint(ids, trained)
    assert sample_fingerprint(ids.astype(np.uint16), trained) == base
    assert sample_fingerprint(np.array([5, 6, 8]), trained) != base
    assert sample_fingerprint(ids, np.array([True, True, True])) != base
    # packbits pads to whole bytes: a trailing untrained token must still change the fingerprint
    assert sample_fingerprint(np.array([5, 6, 7, 0]), np.array([False, True, True, False])) != base


def test_duplicate_and_overlap_counts():
    assert duplicate_count(np.array([1, 2, 1, 1, 3], dtype=np.uint64)) == 2
    assert duplicate_count(np.zeros(0, dtype=np.uint64)) == 0
    assert overlap_counts(np.array([1, 2, 9], dtype=np.uint64), np.array([2, 1, 2], dtype=np.uint64)) == 2
    assert overlap_counts(np.zeros(0, dtype=np.uint64), np.array([1], dtype=np.uint64)) == 0


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


def _records(indices) -> list[dict]:
    return [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}"} for i in indices]


def test_prepare_counts_duplicates_and_eval_overlap_is_reported(tiny_tokenizer, tmp_path):
    # 10 distinct samples, 3 of them twice more: 16 records, 6 exact duplicates.
    train = _write(tmp_path / "train.jsonl", _records(list(range(10)) + [0, 1, 2, 0, 1, 2]))
    evaluation = _write(tmp_path / "eval.jsonl", _records([1, 2, 50, 51]))
    cfg = DataConfig(sources=[SourceSpec(name="train", path=str(train)), SourceSpec(name="eval", path=str(evaluation))],
                     template="chatml")
    train_source, eval_source = prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    assert len(train_source) == 16 and train_source.manifest["counts"]["duplicate_samples"] == 6
    assert eval_source.manifest["counts"]["duplicate_samples"] == 0
    warnings = eval_overlap_warnings([train_source], [("eval", eval_source)])
    assert warnings == [
        "eval set 'eval': 2 of 4 samples also occur in training source 'train' (exact duplicates), so its eval "
        "loss overstates how well the model generalises"
    ]
    # Reused shards keep the figures.
    again, _ = prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    assert again.manifest["counts"]["duplicate_samples"] == 6 and np.array_equal(again.fingerprints,
                                                                                train_source.fingerprints)


def test_held_out_split_overlap_with_its_own_training_part(tiny_tokenizer, tmp_path):
    """Duplicates across the held-out boundary of one source are contamination too."""
    records = _records(range(40)) + _records(range(40))  # every sample twice
    path = _write(tmp_path / "dup.jsonl", records)
    spec = SourceSpec(name="dup", path=str(path), eval_count=8)
    cfg = DataConfig(sources=[spec], template="chatml")
    (source,) = prepare_sources(cfg, tiny_tokenizer, tmp_path / "out", show_progress=False)
    training, held_out = split_source(source, spec)
    assert len(held_out.fingerprints) == 8 and len(training.fingerprints) == 72
    shared = overlap_counts(held_out.fingerprints, training.fingerprints)
    assert 1 <= shared <= 8
    assert len(eval_overlap_warnings([training], [("dup", held_out)])) == 1
    clean = _write(tmp_path / "clean.jsonl", _records(range(40)))
    clean_spec = SourceSpec(name="clean", path=str(clean), eval_count=8)
    (clean_source,) = prepare_sources(DataConfig(sources=[clean_spec], template="chatml"), tiny_tokenizer,
                                      tmp_path / "out", show_progress=False)
    clean_training, clean_held_out = split_source(clean_source, clean_spec)
    assert eval_overlap_warnings([clean_training], [("clean", clean_held_out)]) == []


def test_report_line_names_the_duplicates(tiny_tokenizer, tmp_path, capsys):
    path = _write(tmp_path / "d.jsonl", _records([0, 0, 1]))
    prepare_sources(DataConfig(sources=[SourceSpec(name="d", path=str(path))], template="chatml"), tiny_tokenizer,
                    tmp_path / "out", show_progress=True)
    assert "exact duplicates: 1 samples repeat an earlier sample of this source (33.3%)" in capsys.readouterr().err
