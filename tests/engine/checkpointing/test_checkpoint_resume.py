"""checkpoint.resume given as a path: a checkpoint, `latest` (file or symlink), or the folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.checkpointing.checkpoint import COMPLETE, LATEST, TRAINER_STATE, resolve_resume, tag_for
from engine.config import ConfigError


def _checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    ckpt = root / tag_for(step)
    ckpt.mkdir(parents=True)
    (ckpt / TRAINER_STATE).write_text(json.dumps({"step": step}))
    if complete:
        (ckpt / COMPLETE).write_text(f"{step}\n")
    return ckpt


def test_missing_path_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^checkpoint.resume: .*step_9 does not exist$"):
        resolve_resume(str(tmp_path / "step_9"))


def test_latest_pointer_file_resolves_to_the_checkpoint_it_names(tmp_path):
    root = tmp_path / "checkpoints"
    _checkpoint(root, 4)
    newest = _checkpoint(root, 8)
    (root / LATEST).write_text(tag_for(8) + "\n")
    assert resolve_resume(str(root / LATEST)) == newest.resolve()
    assert resolve_resume(str(root)) == newest  # the checkpoints folder: its latest
    assert resolve_resume(str(newest)) == newest.resolve()


def test_latest_symlink_resolves(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt = _checkpoint(root, 4)
    os.symlink(ckpt.name, root / LATEST)
    assert resolve_resume(str(root / LATEST)) == ckpt.resolve()
    os.symlink("step_gone", root / "broken")
    with pytest.raises(ConfigError, match="broken symbolic link"):
        resolve_resume(str(root / "broken"))


def test_incomplete_or_foreign_directories_are_refused(tmp_path):
    partial = _checkpoint(tmp_path / "checkpoints", 4, complete=False)
    with pytest.raises(ConfigError, match=r"^checkpoint.resume: .*is not a complete checkpoint"):
        resolve_resume(str(partial))
    (tmp_path / "checkpoints" / LATEST).write_text("step_00000099\n")
    with pytest.raises(ConfigError, match=r"neither a checkpoint directory nor a pointer naming one"):
        resolve_resume(str(tmp_path / "checkpoints" / LATEST))
    with pytest.raises(ConfigError, match="is not a complete checkpoint"):
        resolve_resume(str(tmp_path))  # some other folder
