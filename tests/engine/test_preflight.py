"""Checks made before any data or model work: seq_len against the model, tokenizer and model paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config
from engine.preflight import check_before_data, check_seq_len, check_stages_before_data, load_run_tokenizer, \
    model_max_positions
from engine.config import expand_stages

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "configs" / "sft" / "demo.yaml"


def _model_dir(tmp_path: Path, **hf_config) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", **hf_config}))
    return model


def test_seq_len_beyond_from_scratch_positions_names_both_values():
    cfg = load_config(DEMO, ["data.seq_len=1024"])  # the demo model has 512 positions
    with pytest.raises(ConfigError, match=r"data.seq_len=1024 exceeds the model's max_position_embeddings=512 "
                                          r"\(model.from_scratch.max_position_embeddings\)"):
        check_seq_len(cfg)
    assert "256 <= 512" in check_seq_len(load_config(DEMO))


def test_seq_len_beyond_a_pretrained_models_positions_names_its_config(tmp_path):
    model = _model_dir(tmp_path, max_position_embeddings=2048)
    cfg = load_config(DEMO, [f"model.path={model}", "data.seq_len=4096"])
    assert model_max_positions(cfg) == (2048, f"max_position_embeddings in {model / 'config.json'}")
    with pytest.raises(ConfigError, match=r"data.seq_len=4096 exceeds the model's max_position_embeddings=2048"):
        check_seq_len(cfg)
    (tmp_path / "gpt2").mkdir()
    gpt2_style = _model_dir(tmp_path / "gpt2", n_positions=1024)
    assert model_max_positions(load_config(DEMO, [f"model.path={gpt2_style}"]))[0] == 1024


def test_missing_tokenizer_directory_names_the_key(tmp_path):
    cfg = load_config(DEMO, [f"tokenizer.path={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"^tokenizer.path: tokenizer directory .*nope does not exist"):
        load_run_tokenizer(cfg)
    model = _model_dir(tmp_path)  # a model directory without tokenizer files
    cfg = load_config(DEMO, [f"model.path={model}"])
    with pytest.raises(ConfigError, match=r"^model.path: cannot load a tokenizer"):
        load_run_tokenizer(cfg)


def test_real_run_checks_stop_before_any_data_work(tmp_path):
    checks = lambda *o: check_before_data(load_config(DEMO, [f"run_dir={tmp_path}", *o]), 2, on_cuda=False,
                                          base_dir=REPO_ROOT)
    assert checks()["train_batch_size"] == 8
    with pytest.raises(ConfigError, match=r"^tokenizer.path: "):
        checks(f"tokenizer.path={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match=r"^model.path: .*nope does not exist"):
        checks(f"model.path={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match=r"^data.seq_len=4096"):
        checks("data.seq_len=4096")
    with pytest.raises(ConfigError, match=r"^checkpoint.resume: .*missing does not exist"):
        checks(f"checkpoint.resume={tmp_path / 'missing'}")


def test_a_later_stages_deepspeed_mistake_fails_before_the_first_stage(tmp_path):
    ds = json.loads((REPO_ROOT / "configs" / "ds" / "zero2.json").read_text())
    ds["zero_optimization"]["stage"] = 7
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    replay = REPO_ROOT / "configs" / "sft" / "replay_demo.yaml"
    good = load_config(replay, [f"run_dir={tmp_path}"])
    check_stages_before_data(expand_stages(good), 1, on_cuda=False, base_dir=REPO_ROOT)
    bad = load_config(replay, [f"run_dir={tmp_path}", f"stages[1].train.deepspeed={tmp_path / 'ds.json'}"])
    with pytest.raises(ConfigError, match=r"^stages\[1\] \('sft'\): .*ds.json: zero_optimization.stage: .*got 7"):
        check_stages_before_data(expand_stages(bad), 1, on_cuda=False, base_dir=REPO_ROOT)
