"""Launching a finished run again: a no-op that says so, with the stored summary (no NaN loss, no
second eval line in metrics.jsonl, no new checkpoint)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.integration.tiny_run import RUN_PY, REPO_ROOT, explain, launch_env, read_metrics, tiny_config, write_config


def _launch(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN_PY), "--config", str(config)], cwd=REPO_ROOT, env=launch_env(),
                          capture_output=True, text=True, timeout=300, check=False)


def test_second_launch_of_a_finished_run_does_nothing(tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, max_steps=2, log={"sample_prompts": []}, checkpoint={"every_steps": 0})
    cfg["data"]["sources"][0]["eval_count"] = 16
    config = write_config(tmp_path / "run.yaml", cfg)
    first = _launch(config)
    assert first.returncode == 0, explain(first)
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert any("eval/loss" in m for m in read_metrics(run_dir))

    second = _launch(config)
    assert second.returncode == 0, explain(second)
    assert "run already finished at step 2; nothing to do" in second.stdout
    assert "NaN" not in second.stdout
    assert json.loads(second.stdout.strip().splitlines()[-1]) == summary
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")] == ["step_00000002"]
