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

import copy
import dataclasses
import gc
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from engine.config import ConfigError, RunConfig, build_config, to_dict
from engine.state import RunSummary

STAGE_COMPLETE = "STAGE_COMPLETE"
SFT_LR_SHARE_OF_CPT = 0.1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DERIVED_KEYS = ("run_dir", "stages")
"""Keys a stage may not set: its directory is <run_dir>/<name>, and stages do not nest."""


@dataclass(frozen=True)
class Stage:
    """One stage: its name, its full config, and the defaults that were filled in for it."""

    index: int
    name: str
    cfg: RunConfig
    notes: tuple[str, ...]

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def export_dir(self) -> Path:
        return self.run_dir / "export"


def deep_merge(base: dict, override: dict) -> dict:
    """base with override applied: mappings merge recursively, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _stage_name(raw: Any, key: str, seen: set[str]) -> str:
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping with a name and config sections, got {raw!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{key}.name: every stage needs a name usable as a folder name "
                          f"(letters, digits, _ . -), got {name!r}")
    if name in seen:
        raise ConfigError(f"{key}.name: duplicate stage name {name!r}")
    for derived in _DERIVED_KEYS:
        if derived in raw:
            raise ConfigError(f"{key}.{derived}: a stage cannot set {derived!r} (stage {name!r} runs in "
                              "<run_dir>/<name>, and stages do not nest)")
    return name


def _section(raw: dict, section: str) -> dict:
    value = raw.get(section)
    return value if isinstance(value, dict) else {}


def _stage_defaults(tree: dict, raw: dict, previous: list[Stage]) -> list[str]:
    """Fill in the rule-of-thumb defaults the stage leaves unset; return what was filled in."""
    notes = []
    train, data, model = _section(raw, "train"), _section(raw, "data"), _section(raw, "model")
    kind = tree["train"]["kind"]
    if previous and "path" not in model:
        tree["model"]["path"] = str(previous[-1].export_dir)
    if kind == "cpt" and "train_on" not in data and tree["data"]["train_on"] != "everything":
        tree["data"]["train_on"] = "everything"
        notes.append("data.train_on=everything (continued pretraining trains on every token)")
    last_cpt = next((s for s in reversed(previous) if s.cfg.train.kind == "cpt"), None)
    if kind == "sft" and last_cpt is not None:
        cpt_lr = last_cpt.cfg.train.lr
        if "pretrain_lr" not in train:
            tree["train"]["pretrain_lr"] = cpt_lr
        if "lr" not in train:
            tree["train"]["lr"] = SFT_LR_SHARE_OF_CPT * cpt_lr
            notes.append(f"train.lr={tree['train']['lr']:g} ({SFT_LR_SHARE_OF_CPT:.0%} of the lr {cpt_lr:g} of "
                         f"stage {last_cpt.name!r}: SFT after pretraining)")
    return notes


def expand_stages(cfg: RunConfig) -> list[Stage]:
    """The base config's stages as full, validated configs (a ConfigError names stages[i].key)."""
    base = to_dict(cfg)
    base["stages"] = []
    base_dir = Path(cfg.run_dir)
    stages: list[Stage] = []
    seen: set[str] = set()
    for i, raw in enumerate(cfg.stages):
        key = f"stages[{i}]"
        name = _stage_name(raw, key, seen)
        seen.add(name)
        for section, value in raw.items():
            if isinstance(base.get(section), dict) and not isinstance(value, dict):
                raise ConfigError(f"{key}.{section}: expected a mapping of {section} keys, got {value!r}")
        tree = deep_merge(base, {k: v for k, v in raw.items() if k != "name"})
        tree["run_dir"] = str(base_dir / name)
        try:
            if tree["train"].get("kind") not in ("sft", "cpt"):
                raise ConfigError(f"train.kind: {tree['train'].get('kind')!r} is not one of sft, cpt")
            notes = _stage_defaults(tree, raw, stages)
            stage_cfg = build_config(tree)
        except ConfigError as e:
            raise ConfigError(f"{key} ({name!r}): {e}") from None
        if i < len(cfg.stages) - 1 and not stage_cfg.checkpoint.export_at_end:
            raise ConfigError(f"{key}.checkpoint.export_at_end: stage {name!r} must export: the next stage "
                              "starts from its export")
        stages.append(Stage(i, name, stage_cfg, tuple(notes)))
    return stages


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
