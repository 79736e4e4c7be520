"""A tiny but real run config and a way to launch it through the real launchers, for tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Optional

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_PY = REPO_ROOT / "launcher" / "run.py"


def tiny_config(run_dir: Path, *, zero: str = "zero2", max_steps: int = 8, **sections) -> dict:
    """A from-scratch model of ~0.2M parameters on 400 generated demo samples."""
    cfg = {
        "run_dir": str(run_dir),
        "model": {"from_scratch": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                   "num_key_value_heads": 2, "intermediate_size": 128,
                                   "max_position_embeddings": 256}},
        "tokenizer": {"vocab_size": 400},
        "data": {"sources": [{"name": "zh_demo", "path": "builtin:zh_demo?n=400", "format": "alpaca"}],
                 "seq_len": 128, "packing": True, "num_proc": 1},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": max_steps, "lr": 3e-3,
                  "warmup_steps": 1, "deepspeed": f"configs/ds/{zero}.json", "seed": 7},
        "checkpoint": {"every_steps": 4, "keep_last": 2},
        "log": {"every_steps": 1, "sample_prompts": ["把数字 42 写成中文。"], "sample_max_new_tokens": 6},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def launch_deepspeed(config: Path, *overrides: str, num_procs: int = 2, timeout: float = 600,
                     log: Optional[Path] = None) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N launcher/run.py --config X` (on CPU the accelerator is the CPU)."""
    cmd = ["deepspeed", "--num_gpus", str(num_procs), "--master_port", str(free_port()),
           str(RUN_PY), "--config", str(config), *overrides]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr, encoding="utf-8")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout (tail) ---\n{proc.stdout[-4000:]}\n--- stderr (tail) ---\n{proc.stderr[-6000:]}"
