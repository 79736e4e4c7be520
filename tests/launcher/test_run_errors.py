"""A real launch with bad input stops before any data or model work: exit 2, one line naming the
file or config key, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "configs" / "sft" / "demo.yaml"


def _launch(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "launcher" / "run.py"), "--config", str(DEMO),
                           f"run_dir={run_dir}", "train.max_steps=2", "train.warmup_steps=1", "eval.every_steps=0",
                           "checkpoint.every_steps=0", *overrides],
                          capture_output=True, text=True, cwd=REPO_ROOT, check=False, timeout=300)


def _ds_template(tmp_path: Path, name: str, **changes) -> Path:
    ds = json.loads((REPO_ROOT / "configs" / "ds" / "zero2.json").read_text())
    ds.update(changes)
    path = tmp_path / name
    path.write_text(json.dumps(ds))
    return path


@pytest.mark.parametrize("case", ["tokenizer", "resume", "seq_len", "ds_key", "ds_scheduler"])
def test_bad_input_exits_2_with_one_line_naming_it(tmp_path, case):
    overrides, expected = {
        "tokenizer": ([f"tokenizer.path={tmp_path / 'tok'}"], "tokenizer.path: tokenizer directory"),
        "resume": ([f"checkpoint.resume={tmp_path / 'checkpoints' / 'latest'}"], "checkpoint.resume: "),
        "seq_len": (["data.seq_len=4096"], "data.seq_len=4096 exceeds the model's max_position_embeddings=512"),
        "ds_key": ([f"train.deepspeed={_ds_template(tmp_path, 'typo.json', zero_optimizaton={'stage': 3})}"],
                   "typo.json: unknown DeepSpeed config key 'zero_optimizaton'; did you mean 'zero_optimization'?"),
        "ds_scheduler": ([f"train.deepspeed={_ds_template(tmp_path, 'sched.json', scheduler={'type': 'WarmupLR'})}"],
                         "train.use_deepspeed_scheduler: true"),
    }[case]
    completed = _launch(tmp_path / "run", *overrides)
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    (error,) = [line for line in completed.stderr.splitlines() if line.startswith("rank 0: error: ")]
    assert expected in error, completed.stderr
    assert not (tmp_path / "run" / "data").exists()  # stopped before data preparation
