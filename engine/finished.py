"""A run launched again after it finished is a no-op that says so.

Without this, a second launch resumes from the final checkpoint, trains zero steps, evaluates
again (a duplicate eval line in metrics.jsonl), saves and exports again, and reports a NaN final
loss (no step ran). The end of a run leaves <run_dir>/summary.json (step, final loss, export);
a later launch whose resume checkpoint is already at the run's end prints it and does nothing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from engine.checkpointing.checkpoint import read_trainer_state, resume_checkpoint
from engine.config import RunConfig

SUMMARY = "summary.json"
SUMMARY_KEYS = ("step", "final_loss", "export_dir")


def finite_or_none(value: Optional[float]) -> Optional[float]:
    """A loss for JSON: None, not NaN, when no step produced one."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def write_summary(run_dir: Path, summary: dict) -> None:
    """Atomically record the end-of-job summary (rank 0)."""
    record = {k: summary.get(k) for k in SUMMARY_KEYS}
    record["final_loss"] = finite_or_none(record["final_loss"])
    path = Path(run_dir) / SUMMARY
    tmp = path.with_name(f".{SUMMARY}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _stored_summary(run_dir: Path, step: int) -> dict:
    path = Path(run_dir) / SUMMARY
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return stored if isinstance(stored, dict) and stored.get("step") == step else {}


def finished_summary(cfg: RunConfig) -> Optional[dict]:
    """The stored summary when the checkpoint this launch would resume is already at the end of
    the run (train.max_steps, or this job's train.stop_at_step); None when there is work to do."""
    run_dir = Path(cfg.run_dir)
    ckpt = resume_checkpoint(cfg.checkpoint.resume, run_dir / "checkpoints")
    if ckpt is None:
        return None
    step = int(read_trainer_state(ckpt)["step"])
    end = cfg.train.max_steps if cfg.train.stop_at_step is None else cfg.train.stop_at_step
    if step < end:
        return None
    stored = _stored_summary(run_dir, step)
    export = run_dir / "export"
    default_export = str(export) if step >= cfg.train.max_steps and (export / "config.json").is_file() else None
    return {"step": step, "final_loss": finite_or_none(stored.get("final_loss")),
            "export_dir": stored.get("export_dir", default_export), "before": [], "after": [],
            "already_finished": True}


def finished_message(cfg: RunConfig, summary: dict) -> str:
    step = summary["step"]
    record = json.dumps({k: summary.get(k) for k in SUMMARY_KEYS})
    if step >= cfg.train.max_steps:
        return f"run already finished at step {step}; nothing to do (raise train.max_steps to train on): {record}"
    return (f"run already at step {step}, train.stop_at_step={cfg.train.stop_at_step}; nothing to do "
            f"(raise or unset train.stop_at_step to go on): {record}")
