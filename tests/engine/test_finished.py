"""Launching a finished run again does nothing and says so: no resume, eval, save, export or NaN."""

from __future__ import annotations

import json
from pathlib import Path

from engine.checkpointing.checkpoint import COMPLETE, LATEST, TRAINER_STATE, tag_for
from engine.config import load_config
from engine.finished import SUMMARY, finished_summary, write_summary
from engine.trainer import Ranks, run_single

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "configs" / "sft" / "demo.yaml"


def _saved_at(run_dir: Path, step: int) -> None:
    ckpt = run_dir / "checkpoints" / tag_for(step)
    ckpt.mkdir(parents=True)
    (ckpt / TRAINER_STATE).write_text(json.dumps({"step": step}))
    (ckpt / COMPLETE).write_text(f"{step}\n")
    (run_dir / "checkpoints" / LATEST).write_text(tag_for(step) + "\n")


def test_relaunch_of_a_finished_run_is_a_no_op_with_the_stored_summary(tmp_path, capsys):
    cfg = load_config(DEMO, [f"run_dir={tmp_path}", "train.max_steps=8", "train.warmup_steps=1"])
    _saved_at(tmp_path, 8)
    write_summary(tmp_path, {"step": 8, "final_loss": 1.25, "export_dir": str(tmp_path / "export")})
    (tmp_path / "metrics.jsonl").write_text('{"step": 8, "eval/loss": 1.3}\n')

    summary = run_single(cfg, Ranks(rank=0, world_size=1, local_rank=0), REPO_ROOT)

    assert (summary.step, summary.final_loss, summary.export_dir) == (8, 1.25, str(tmp_path / "export"))
    out = capsys.readouterr().out
    assert "run already finished at step 8; nothing to do" in out and '"final_loss": 1.25' in out
    assert "NaN" not in out
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 8, "eval/loss": 1.3}\n'  # no duplicate line
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [LATEST, tag_for(8)]


def test_a_run_with_steps_left_is_not_finished(tmp_path):
    _saved_at(tmp_path, 4)
    assert finished_summary(load_config(DEMO, [f"run_dir={tmp_path}", "train.max_steps=8", "train.warmup_steps=1"])) is None
    assert finished_summary(load_config(DEMO, [f"run_dir={tmp_path / 'fresh'}"])) is None
    stopped = finished_summary(load_config(DEMO, [f"run_dir={tmp_path}", "train.max_steps=8", "train.warmup_steps=1",
                                                  "train.stop_at_step=4"]))
    assert stopped["step"] == 4 and stopped["final_loss"] is None


def test_summary_never_stores_nan(tmp_path):
    write_summary(tmp_path, {"step": 3, "final_loss": float("nan"), "export_dir": None})
    assert json.loads((tmp_path / SUMMARY).read_text()) == {"step": 3, "final_loss": None, "export_dir": None}
