"""Multi-stage training: stages run one after another, each starting from the previous one's export.

A run config may list `stages:`, each a `name` plus partial config sections merged on top of the
base config (mappings merge key by key; lists such as data.sources are replaced whole). Stage k
runs in <run_dir>/<name>/ and, unless it names its own model.path, starts from stage k-1's export
(<run_dir>/<previous name>/export: weights and tokenizer). The usual training modes:

    base -> domain SFT                            one stage (or no stages at all)
    base -> continued pretraining -> domain SFT   [{name: cpt, train: {kind: cpt}}, {name: sft}]
    base -> general SFT -> domain SFT             [{name: general, ...}, {name: domain, ...}]
    replay: SFT data mixed into pretraining       a cpt stage whose sources include an SFT set

Defaults that follow the rules of thumb (engine/rules.py says why), applied only where the stage
itself leaves the key unset, and each one printed:
  * a cpt stage trains on every token (data.train_on=everything);
  * an sft stage after a cpt stage uses 10% of that stage's lr, and checks its lr against it
    (train.pretrain_lr).
Resumable: a finished stage leaves <stage dir>/STAGE_COMPLETE next to its export and is skipped
when the run is launched again; an unfinished one resumes from its own checkpoints.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist

from engine.config import RunConfig, Stage, expand_stages
from engine.state import RunSummary

STAGE_COMPLETE = "STAGE_COMPLETE"


# ----------------------------------------------------------------------------------------------
# running


def stage_finished(stage: Stage) -> Optional[dict]:
    """The summary of a stage that finished earlier, or None."""
    marker = stage.run_dir / STAGE_COMPLETE
    if not marker.is_file() or not (stage.export_dir / "config.json").is_file():
        return None
    return json.loads(marker.read_text(encoding="utf-8"))


def mark_finished(stage: Stage, summary: RunSummary) -> None:
    """Atomically record that the stage finished (rank 0, after its export is written)."""
    marker = stage.run_dir / STAGE_COMPLETE
    tmp = marker.with_name(f".{STAGE_COMPLETE}.tmp{os.getpid()}")
    record = stage_record(stage, summary)
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    os.replace(tmp, marker)


def stage_record(stage: Stage, summary: RunSummary) -> dict:
    """What STAGE_COMPLETE holds, and what a run of stages lists per finished stage."""
    return {"stage": stage.name, "step": summary.step, "final_loss": summary.final_loss,
            "export_dir": str(stage.export_dir)}


def _release_memory() -> None:
    """Drop the finished stage's engine before the next one builds its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_stages(cfg: RunConfig, *, is_main: bool, run_one: Callable[[RunConfig], RunSummary],
               say: Callable[[str], None]) -> RunSummary:
    """Run every stage not finished yet; the summary of the last stage run, plus all stages'.
    (The rules of thumb across stages, engine/rules.py, are checked by the caller beforehand.)"""
    stages = expand_stages(cfg)
    done: list[dict] = []
    summary = RunSummary(step=0, final_loss=None, export_dir=None)
    for stage in stages:
        earlier = stage_finished(stage)
        if earlier is not None:
            say(f"stage {stage.index + 1}/{len(stages)} {stage.name!r}: finished earlier; skipped")
            summary = RunSummary.from_record(earlier)
            done.append(earlier)
            continue
        say(f"stage {stage.index + 1}/{len(stages)} {stage.name!r} ({stage.cfg.train.kind}) in {stage.run_dir}")
        for note in stage.notes:
            say(f"  default: {note}")
        summary = run_one(stage.cfg)
        _release_memory()
        if summary.step < stage.cfg.train.max_steps:  # train.stop_at_step: resume this stage later
            return dataclasses.replace(summary, stages=done)
        if is_main:
            mark_finished(stage, summary)
        if dist.is_initialized():
            dist.barrier()  # no rank starts the next stage before the export and marker exist
        done.append(stage_record(stage, summary))
    return dataclasses.replace(summary, export_dir=done[-1]["export_dir"] if done else None, stages=done)
