"""Stages: expansion into full configs, rule-of-thumb defaults, skip-when-finished, stop-and-resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from engine.config import ConfigError, load_config
from engine.config import expand_stages
from engine.stage_plan import deep_merge
from engine.stages import STAGE_COMPLETE, run_stages
from engine.state import RunSummary

SOURCE = {"name": "zh", "path": "builtin:zh_demo?n=50", "format": "alpaca"}
TEXT = {"name": "txt", "path": "builtin:zh_demo?n=50", "format": "text", "text_field": "output"}


def _config(tmp_path: Path, stages: list, **base) -> Path:
    tree = {"run_dir": str(tmp_path / "run"), "train": {"max_steps": 4, "warmup_steps": 0}, "stages": stages, **base}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    return path


def test_deep_merge_merges_mappings_and_replaces_lists():
    base = {"train": {"lr": 1.0, "kind": "sft"}, "data": {"sources": [1, 2], "seq_len": 8}}
    merged = deep_merge(base, {"train": {"lr": 2.0}, "data": {"sources": [3]}})
    assert merged == {"train": {"lr": 2.0, "kind": "sft"}, "data": {"sources": [3], "seq_len": 8}}
    assert base["train"]["lr"] == 1.0  # the base is untouched


def test_cpt_then_sft_expands_with_defaults(tmp_path):
    cfg = load_config(_config(tmp_path, [
        {"name": "cpt", "train": {"kind": "cpt", "lr": 1e-3}, "data": {"sources": [TEXT]}},
        {"name": "sft", "train": {"kind": "sft"}, "data": {"sources": [SOURCE], "train_on": "all_assistant"}},
    ]))
    cpt, sft = expand_stages(cfg)
    assert cpt.cfg.run_dir == str(tmp_path / "run" / "cpt") and cpt.cfg.model.path == ""
    assert cpt.cfg.data.train_on == "everything" and cpt.notes
    assert sft.cfg.model.path == str(tmp_path / "run" / "cpt" / "export")
    assert sft.cfg.train.lr == pytest.approx(1e-4) and sft.cfg.train.pretrain_lr == pytest.approx(1e-3)
    assert sft.cfg.train.max_steps == 4 and sft.cfg.stages == []


def test_explicit_stage_settings_win_over_defaults(tmp_path):
    cfg = load_config(_config(tmp_path, [
        {"name": "cpt", "train": {"kind": "cpt", "lr": 1e-3}, "data": {"sources": [TEXT], "train_on": "all_assistant"}},
        {"name": "sft", "train": {"lr": 5e-5}, "model": {"path": "elsewhere"}, "data": {"sources": [SOURCE]}},
    ]))
    cpt, sft = expand_stages(cfg)
    assert cpt.cfg.data.train_on == "all_assistant"
    assert sft.cfg.train.lr == 5e-5 and sft.cfg.model.path == "elsewhere"


@pytest.mark.parametrize("stages, message", [
    ([{"train": {"lr": 1.0}}], r"stages\[0\]\.name"),
    ([{"name": "a", "data": {"sources": [SOURCE]}}, {"name": "a"}], "duplicate stage name"),
    ([{"name": "a", "run_dir": "x"}], r"stages\[0\]\.run_dir"),
    ([{"name": "a", "data": {"sources": [SOURCE]}, "train": {"lrr": 1.0}}], r"stages\[0\] \('a'\): unknown config key 'train.lrr'"),
    ([{"name": "a"}], r"stages\[0\] \('a'\): data.sources: at least one source"),
    ([{"name": "a", "data": {"sources": [SOURCE]}, "checkpoint": {"export_at_end": False}}, {"name": "b"}],
     r"stages\[0\]\.checkpoint\.export_at_end"),
    ([{"name": "a", "train": "fast"}], r"stages\[0\]\.train: expected a mapping"),
])
def test_bad_stages_name_the_key(tmp_path, stages, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, stages))


def _run_recorder(calls: list, stop_at: dict | None = None):
    def run_one(cfg):
        calls.append(cfg.run_dir)
        export = Path(cfg.run_dir) / "export"
        step = (stop_at or {}).get(Path(cfg.run_dir).name, cfg.train.max_steps)
        if step == cfg.train.max_steps:
            export.mkdir(parents=True)
            (export / "config.json").write_text("{}")
        return RunSummary(step=step, final_loss=1.0, export_dir=str(export))
    return run_one


def test_run_stages_skips_finished_and_resumes_stopped(tmp_path):
    # Stages override the base config, not each other: the sources here come from the base.
    cfg = load_config(_config(tmp_path, [{"name": "a"}, {"name": "b"}, {"name": "c"}], data={"sources": [SOURCE]}))
    calls: list = []
    first = run_stages(cfg, is_main=True, run_one=_run_recorder(calls, stop_at={"b": 2}), say=lambda _: None)
    assert [Path(c).name for c in calls] == ["a", "b"] and first.step == 2  # b stopped early: c waits
    assert (tmp_path / "run" / "a" / STAGE_COMPLETE).is_file() and not (tmp_path / "run" / "b" / STAGE_COMPLETE).exists()
    calls.clear()
    said: list = []
    second = run_stages(cfg, is_main=True, run_one=_run_recorder(calls), say=said.append)
    assert [Path(c).name for c in calls] == ["b", "c"]
    assert any("'a': finished earlier; skipped" in s for s in said)
    assert [s["stage"] for s in second.stages] == ["a", "b", "c"]
    assert second.export_dir == str(tmp_path / "run" / "c" / "export")
    assert json.loads((tmp_path / "run" / "c" / STAGE_COMPLETE).read_text())["step"] == 4
