"""The trainer's start-up order: config checks that need no model fail before any data work."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import trainer
from engine.config import ConfigError, load_config
from engine.trainer import Ranks, Trainer

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "configs" / "sft" / "demo.yaml"


def _no_data_work(*_args, **_kwargs):
    raise AssertionError("data or tokenizer work started before the config checks")


def test_unsupported_nan_policy_fails_before_data_preparation(tmp_path, monkeypatch):
    # nan_policy=skip needs an optimizer that refuses non-finite steps; fp32 ZeRO-0 has none.
    cfg = load_config(DEMO, [f"run_dir={tmp_path}", "train.nan_policy=skip", "train.deepspeed=configs/ds/zero0.json"])
    for step in ("setup_tokenizer", "prepare_sources", "open_prepared", "build_model"):
        monkeypatch.setattr(trainer, step, _no_data_work)
    with pytest.raises(ConfigError, match=r"train.nan_policy=skip needs .*ZeRO-0, fp32"):
        Trainer(cfg, Ranks(rank=0, world_size=1, local_rank=0), REPO_ROOT).setup()


def test_supported_nan_policy_passes_the_start_up_checks(tmp_path, monkeypatch):
    cfg = load_config(DEMO, [f"run_dir={tmp_path}", "train.nan_policy=skip", "train.deepspeed=configs/ds/zero1.json"])
    monkeypatch.setattr(trainer, "setup_tokenizer", _no_data_work)
    with pytest.raises(AssertionError, match="data or tokenizer work started"):  # the checks let it through
        Trainer(cfg, Ranks(rank=0, world_size=1, local_rank=0), REPO_ROOT).setup()
