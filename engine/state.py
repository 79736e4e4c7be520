"""The two records a run leaves behind: TrainerState (what resume reads) and RunSummary (what a run
returns, and what summary.json and the launcher's last stdout line hold).

TrainerState is trainer_state.json in each checkpoint (engine/checkpointing/checkpoint.py writes it and adds
the eval `metric`). The rest of what resume restores lives beside it, in files of its own: the
weights, optimizer moments and lr schedule in DeepSpeed's files, each rank's RNG states in
rng_rank{r}.pt. The data position is `data` (SFTStream.state_dict: the schedule position of the
next global batch plus a fingerprint of the schedule inputs), so resume neither repeats nor skips
a sample, on any world size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from engine.checkpointing.checkpoint import read_trainer_state
from engine.finished import SUMMARY_KEYS, finite_or_none


@dataclass(frozen=True)
class TrainerState:
    """The trainer's part of a checkpoint, saved before the step `step + 1` is drawn."""

    step: int
    data: dict[str, Any]
    world_size: int
    consumption: dict[str, Any] = field(default_factory=dict)
    """engine/checkpointing/consumption.py: cumulative per-source counters (empty in older checkpoints)."""
    time: float = field(default_factory=time.time)
    metric: Optional[float] = None
    """The eval loss at this step, if one was computed (checkpoint.keep_best ranks by it)."""

    def to_json(self) -> dict[str, Any]:
        """The trainer_state.json record, less `metric`, which checkpoint.save adds."""
        return {"step": self.step, "data": self.data, "world_size": self.world_size, "time": self.time,
                "consumption": self.consumption}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "TrainerState":
        return cls(step=int(record["step"]), data=record.get("data", {}), world_size=int(record.get("world_size", 0)),
                   consumption=record.get("consumption") or {}, time=float(record.get("time", 0.0)),
                   metric=record.get("metric"))

    @classmethod
    def read(cls, ckpt: Path) -> "TrainerState":
        return cls.from_json(read_trainer_state(ckpt))


@dataclass(frozen=True)
class RunSummary:
    """What a run (or a run of stages) returns.

    step: the last step trained; final_loss: its loss (None when no step ran or it was not
    finite); export_dir: the exported HF model, if any. before/after: greedy answers to
    log.sample_prompts before and after training. stages: the STAGE_COMPLETE record of each stage
    finished so far (multi-stage runs). already_finished: this launch found the run finished.
    """

    step: int
    final_loss: Optional[float]
    export_dir: Optional[str]
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    already_finished: bool = False

    def record(self) -> dict[str, Any]:
        """The JSON record (summary.json, the launcher's stdout line): SUMMARY_KEYS, never NaN."""
        values = {"step": self.step, "final_loss": finite_or_none(self.final_loss), "export_dir": self.export_dir}
        return {k: values[k] for k in SUMMARY_KEYS}

    @classmethod
    def from_record(cls, record: dict[str, Any], **extra: Any) -> "RunSummary":
        """From a stored record (summary.json, STAGE_COMPLETE, engine/finished.py's summary)."""
        return cls(step=int(record["step"]), final_loss=finite_or_none(record.get("final_loss")),
                   export_dir=record.get("export_dir"), already_finished=bool(record.get("already_finished")),
                   **extra)
