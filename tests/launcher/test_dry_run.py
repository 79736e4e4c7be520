"""`launcher/run.py --dry-run` prints what would run, each stage's config included, and starts nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


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


def test_bad_stage_key_is_a_config_error_naming_the_stage():
    completed = dry_run("configs/sft/replay_demo.yaml", "stages=[{name: x, train: {kind: rl}}]")
    assert completed.returncode == 2
    assert "stages[0]" in completed.stderr and "train.kind" in completed.stderr
