"""`launcher/run.py --dry-run` checks everything that needs no training (one line per check, exit 2
when one fails), prints what would run, each stage's config included, and starts nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def dry_run(config: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "launcher" / "run.py"), "--config", str(REPO_ROOT / config), *overrides,
         "--dry-run", "--world-size", "2"],
        capture_output=True, text=True, cwd=REPO_ROOT, check=False, timeout=300,
    )


def test_single_stage_config_resolves_run_and_deepspeed_configs():
    completed = dry_run("configs/sft/demo.yaml", "train.lr=1e-3")
    assert completed.returncode == 0, completed.stderr
    resolved = json.loads(completed.stdout)
    assert resolved["run_config"]["train"]["lr"] == 1e-3
    assert resolved["deepspeed_config"]["train_batch_size"] == resolved["run_config"]["train"]["global_batch_size"]
    assert resolved["world_size"] == 2 and "stages" not in resolved
    lines = completed.stderr.splitlines()
    for key in ("train.deepspeed", "train.nan_policy", "checkpoint.resume", "data.sources[0].path", "tokenizer",
                "data.template", "data.seq_len"):
        assert any(line.startswith(f"ok    {key}: ") for line in lines), (key, completed.stderr)
    assert "dry run: all 7 checks passed" in completed.stderr


def test_staged_config_shows_each_stage_as_it_will_run():
    completed = dry_run("configs/sft/replay_demo.yaml")
    assert completed.returncode == 0, completed.stderr
    resolved = json.loads(completed.stdout)
    cpt, sft = resolved["stages"]
    assert (cpt["name"], sft["name"]) == ("cpt_replay", "sft")
    assert cpt["run_config"]["data"]["train_on"] == "everything"
    assert any("train_on=everything" in note for note in cpt["defaults_filled"])
    replay_source = {s["name"]: s for s in cpt["run_config"]["data"]["sources"]}["zh_chat_replay"]
    assert replay_source["train_on"] == "all_assistant"
    assert sft["run_config"]["train"]["lr"] < cpt["run_config"]["train"]["lr"]
    assert sft["run_dir"].endswith("replay_demo/sft")
    assert sft["deepspeed_config"]["train_batch_size"] == 16
    assert resolved["warnings"] == []
    for stage in ("stages[0] (cpt_replay)", "stages[1] (sft)"):
        assert f"ok    {stage} train.deepspeed: " in completed.stderr
        assert f"ok    {stage} data.seq_len: " in completed.stderr
    assert "error" not in completed.stderr


def test_bad_stage_key_is_a_config_error_naming_the_stage():
    completed = dry_run("configs/sft/replay_demo.yaml", "stages=[{name: x, train: {kind: rl}}]")
    assert completed.returncode == 2
    assert "stages[0]" in completed.stderr and "train.kind" in completed.stderr


def _error_lines(completed: subprocess.CompletedProcess) -> dict[str, str]:
    return {line.split(": ", 1)[0][6:]: line for line in completed.stderr.splitlines() if line.startswith("error ")}


def test_every_broken_input_is_reported_with_its_key(tmp_path):
    ds = json.loads((REPO_ROOT / "configs" / "ds" / "zero2.json").read_text())
    ds["zero_optimizaton"] = ds.pop("zero_optimization")
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    sharegpt = tmp_path / "chat.jsonl"
    sharegpt.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    sources = (f"data.sources=[{{name: gone, path: {tmp_path / 'gone.jsonl'}, format: alpaca}}, "
               f"{{name: chat, path: {sharegpt}, format: alpaca}}]")
    completed = dry_run("configs/sft/demo.yaml", f"train.deepspeed={tmp_path / 'ds.json'}", sources,
                        "data.on_error=strict", f"checkpoint.resume={tmp_path / 'missing'}",
                        f"tokenizer.path={tmp_path / 'no_tokenizer'}", "data.seq_len=1024")
    assert completed.returncode == 2, completed.stderr
    assert completed.stdout == "" and "Traceback" not in completed.stderr
    errors = _error_lines(completed)
    assert "unknown DeepSpeed config key 'zero_optimizaton'; did you mean 'zero_optimization'?" in errors["train.deepspeed"]
    assert "missing does not exist" in errors["checkpoint.resume"]
    assert "source 'gone'" in errors["data.sources[0].path"] and "no such file" in errors["data.sources[0].path"]
    assert f"{sharegpt}:1" in errors["data.sources[1].path"]
    assert "no_tokenizer does not exist" in errors["tokenizer.path"]
    assert "data.seq_len=1024 exceeds the model's max_position_embeddings=512" in errors["data.seq_len"]
    assert "dry run: 6 of " in completed.stderr


def test_real_tokenizer_and_template_are_checked_and_remote_sources_skipped(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    sources = (f"data.sources=[{{name: alpaca, path: {SHARED_DATA / 'alpaca_zh_demo.json'}, format: alpaca}}, "
               "{name: remote, path: 's3://bucket/sft/*.jsonl', format: sharegpt}]")
    tokenizer = f"tokenizer.path={SHARED_DATA / 'tokenizer-zh-6400'}"
    completed = dry_run("configs/sft/demo.yaml", sources, tokenizer)
    assert completed.returncode == 0, completed.stderr
    assert "ok    data.sources[0].path: source 'alpaca': 8 of the first 8 records parse as alpaca" in completed.stderr
    assert "skip  data.sources[1].path: s3://bucket/sft/*.jsonl: a remote source is not read" in completed.stderr
    assert "ok    tokenizer.path: loads" in completed.stderr
    assert "ok    data.template: " in completed.stderr and "renders a sample" in completed.stderr

    completed = dry_run("configs/sft/demo.yaml", sources, tokenizer, f"data.template={tmp_path / 'none.jinja'}")
    assert completed.returncode == 2
    assert "unknown template" in _error_lines(completed)["data.template"]
