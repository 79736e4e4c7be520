"""A staged run config planned as one config tree per stage, with the rules-of-thumb defaults filled in.

Works on plain config trees (the mappings `to_dict` gives), below engine/config.py, which builds
and validates every planned tree as a RunConfig (`expand_stages`). What stages are and how they
run: engine/stages.py. Stage k's tree is the base tree with the stage's sections merged on top
(mappings key by key, lists replaced whole), run_dir <run_dir>/<name>, and, unless the stage names
its own model.path, the previous stage's export as its model. The defaults (engine/rules.py says
why) apply only where the stage leaves the key unset, and each is returned as a note:
  * a cpt stage trains on every token (data.train_on=everything);
  * an sft stage after a cpt stage uses 10% of that stage's lr and checks against it
    (train.pretrain_lr).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from engine.config_tree import ConfigError

SFT_LR_SHARE_OF_CPT = 0.1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DERIVED_KEYS = ("run_dir", "stages")
"""Keys a stage may not set: its directory is <run_dir>/<name>, and stages do not nest."""


@dataclass(frozen=True)
class StageTree:
    """One planned stage: where it sits, its name, its merged config tree and the defaults filled in."""

    index: int
    key: str
    """Where the stage is in the config (stages[i]), for error messages."""
    name: str
    tree: dict
    notes: tuple[str, ...]


def deep_merge(base: dict, override: dict) -> dict:
    """base with override applied: mappings merge recursively, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def plan_stages(base: dict, raw_stages: list[Any]) -> Iterator[StageTree]:
    """The stages of a base config tree, one merged tree each (a ConfigError names stages[i].key).
    Lazy: the caller builds each stage before the next is planned, so errors come in stage order."""
    base = copy.deepcopy(base)
    base["stages"] = []
    base_dir = Path(base["run_dir"])
    planned: list[StageTree] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_stages):
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
            notes = _stage_defaults(tree, raw, planned)
        except ConfigError as e:
            raise ConfigError(f"{key} ({name!r}): {e}") from None
        stage = StageTree(i, key, name, tree, tuple(notes))
        planned.append(stage)
        yield stage


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


def _stage_defaults(tree: dict, raw: dict, previous: list[StageTree]) -> list[str]:
    """Fill in the rule-of-thumb defaults the stage leaves unset; return what was filled in."""
    notes = []
    train, data, model = _section(raw, "train"), _section(raw, "data"), _section(raw, "model")
    kind = tree["train"]["kind"]
    if previous and "path" not in model:
        tree["model"]["path"] = str(Path(previous[-1].tree["run_dir"]) / "export")
    if kind == "cpt" and "train_on" not in data and tree["data"]["train_on"] != "everything":
        tree["data"]["train_on"] = "everything"
        notes.append("data.train_on=everything (continued pretraining trains on every token)")
    last_cpt = next((s for s in reversed(previous) if s.tree["train"]["kind"] == "cpt"), None)
    if kind == "sft" and last_cpt is not None:
        cpt_lr = float(last_cpt.tree["train"]["lr"])  # that stage was built, so its lr is a number
        if "pretrain_lr" not in train:
            tree["train"]["pretrain_lr"] = cpt_lr
        if "lr" not in train:
            tree["train"]["lr"] = SFT_LR_SHARE_OF_CPT * cpt_lr
            notes.append(f"train.lr={tree['train']['lr']:g} ({SFT_LR_SHARE_OF_CPT:.0%} of the lr {cpt_lr:g} of "
                         f"stage {last_cpt.name!r}: SFT after pretraining)")
    return notes
