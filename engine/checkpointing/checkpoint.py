"""Checkpoints: DeepSpeed model/optimizer/scheduler states + the data position + RNG, saved atomically.

Layout under <run_dir>/checkpoints:
    step_00000100/            DeepSpeed's files for tag "step_00000100" (every rank writes its part)
        rng_rank{r}.pt        each rank's RNG states
        trainer_state.json    step, data-stream state, world size, eval metric (rank 0)
        run_config.json       the resolved run config (checked for compatibility on resume)
        hf/                   HF model config, generation config, tokenizer: what an offline
                              export needs besides the weights (engine/export.py)
        universal/            written on demand when resuming on another world size (engine/checkpointing/reshard.py)
        COMPLETE              written last, after every rank has finished writing
    latest                    the tag of the newest complete checkpoint (replaced atomically)
    best                      the tag of the complete checkpoint with the lowest eval metric

A kill at any moment leaves `latest` naming a checkpoint whose COMPLETE marker exists: the marker is
written only after a barrier that every rank reaches once its files are on disk, and `latest` is
switched with os.replace only after that. Older checkpoints are deleted only after a newer one is
complete, and a deletion first renames the directory away (atomic), so a kill during the deletion
never leaves a half-deleted directory that still looks complete. The checkpoint directory must be
on storage that every node sees (as for DeepSpeed).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from engine.config import ConfigError
from engine.checkpointing.reshard import ResumeSource
from engine.checkpointing.retention import SavedCheckpoint, best_steps, steps_to_delete

COMPLETE = "COMPLETE"
LATEST = "latest"
BEST = "best"
TAG_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "run_config.json"
HF_DIR = "hf"
TRASH_PREFIX = ".deleting-"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / COMPLETE).is_file()


def step_of(ckpt_dir: Path) -> int:
    name = Path(ckpt_dir).name
    if not name.startswith(TAG_PREFIX) or not name[len(TAG_PREFIX):].isdigit():
        raise ValueError(f"{ckpt_dir}: not a checkpoint directory name ({TAG_PREFIX}NNNNNNNN)")
    return int(name[len(TAG_PREFIX):])


def read_trainer_state(ckpt_dir: Path) -> dict:
    return json.loads((Path(ckpt_dir) / TRAINER_STATE).read_text(encoding="utf-8"))


def read_run_config(ckpt_dir: Path) -> Optional[dict]:
    path = Path(ckpt_dir) / RUN_CONFIG
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def find_latest(root: Path) -> Optional[Path]:
    """The checkpoint to resume from: `latest` if it names a complete one, else the newest complete."""
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if is_complete(candidate):
            return candidate
    done = complete_checkpoints(root)
    return done[-1] if done else None


def resolve_resume(value: str, key: str = "checkpoint.resume") -> Path:
    """The complete checkpoint a user-given resume path names.

    Accepted: a step_NNNNNNNN directory; the `latest` or `best` pointer file this module writes
    (or a symlink to a checkpoint), which resolves to the checkpoint it names; or the checkpoints
    folder itself, which means its latest complete checkpoint. Anything else is a ConfigError
    naming `key`, so a typo in the path never starts a run from scratch or ends in a traceback.
    """
    given = Path(value)
    if not given.exists():
        broken = " (a broken symbolic link)" if given.is_symlink() else ""
        raise ConfigError(f"{key}: {value} does not exist{broken}")
    path = given.resolve()
    if path.is_file():  # a pointer file such as checkpoints/latest
        tag = path.read_text(encoding="utf-8").strip()
        target = path.parent / tag
        if not tag or "/" in tag or not target.is_dir():
            raise ConfigError(f"{key}: {value} is neither a checkpoint directory nor a pointer naming one "
                              f"in {path.parent} (it reads {tag[:60]!r})")
        path = target
    elif not path.name.startswith(TAG_PREFIX) and ((path / LATEST).is_file() or complete_checkpoints(path)):
        latest = find_latest(path)  # the checkpoints folder itself
        if latest is None:
            raise ConfigError(f"{key}: {value} holds no complete checkpoint")
        path = latest
    if not is_complete(path):
        raise ConfigError(f"{key}: {path} is not a complete checkpoint (no {COMPLETE} marker: not a "
                          "checkpoint directory, or its save was interrupted)")
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"{key}: {path} has no {TRAINER_STATE}; it was not written by this trainer")
    return path


def resume_checkpoint(mode: str, root: Path) -> Optional[Path]:
    """checkpoint.resume resolved: None (none, or auto with nothing saved yet) or a checkpoint."""
    if mode == "none":
        return None
    if mode == "auto":
        return find_latest(Path(root))
    return resolve_resume(mode)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, trainer_state: dict, *, keep_last: int, keep_best: int = 0,
         metric: Optional[float] = None, run_config: Optional[dict] = None, hf_model=None,
         tokenizer=None) -> Path:
    """Save a complete checkpoint for `step` on every rank (a collective); returns its directory.

    metric: the eval loss at this step, if any; with keep_best > 0 the keep_best checkpoints with
    the lowest metric survive the keep_last rotation. run_config, hf_model (its config and
    generation config) and tokenizer are stored so that resume can check the config and export
    needs nothing but the checkpoint.
    """
    root = Path(root)
    tag = tag_for(step)
    ckpt = root / tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and ckpt.exists():  # a partial leftover of an interrupted save of the same step
        _discard(ckpt)
    _barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(rng_state(), ckpt / f"rng_rank{rank}.pt")
    if rank == 0:
        _atomic_write(ckpt / TRAINER_STATE, json.dumps({**trainer_state, "metric": metric}, indent=1))
        if run_config is not None:
            _atomic_write(ckpt / RUN_CONFIG, json.dumps(run_config, indent=1, ensure_ascii=False, default=str))
        if hf_model is not None or tokenizer is not None:
            save_hf_metadata(ckpt / HF_DIR, hf_model, tokenizer)
    _barrier()  # every rank's files are on disk
    if rank == 0:
        _atomic_write(ckpt / COMPLETE, f"{step}\n")
        _atomic_write(root / LATEST, tag + "\n")
        rotate(root, keep_last=keep_last, keep_best=keep_best)
    _barrier()
    return ckpt


def save_hf_metadata(out: Path, hf_model, tokenizer) -> None:
    """The model's config.json, generation_config.json, with LoRA adapter_config.json, and the
    tokenizer files (no weights)."""
    out.mkdir(parents=True, exist_ok=True)
    if hf_model is not None:
        hf_model.config.save_pretrained(str(out))
        generation = getattr(hf_model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(out))
        adapters = getattr(hf_model, "peft_config", None)  # a LoRA run: the export merges from this
        if adapters:
            adapters["default"].save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def _saved_checkpoints(root: Path) -> list[SavedCheckpoint]:
    found = []
    for ckpt in complete_checkpoints(root):
        metric = read_trainer_state(ckpt).get("metric") if (ckpt / TRAINER_STATE).is_file() else None
        found.append(SavedCheckpoint(step_of(ckpt), None if metric is None else float(metric)))
    return found


def rotate(root: Path, *, keep_last: int, keep_best: int = 0) -> None:
    """Delete what the retention policy drops, update `best`, and clear stale partial saves."""
    saved = _saved_checkpoints(root)
    for step in steps_to_delete(saved, keep_last=keep_last, keep_best=keep_best):
        _discard(root / tag_for(step))
    best = best_steps(saved, 1)
    if keep_best and best:
        _atomic_write(root / BEST, tag_for(best[0]) + "\n")
    newest = max((c.step for c in saved), default=None)
    for path in root.iterdir():
        stale_partial = (path.is_dir() and path.name.startswith(TAG_PREFIX) and not is_complete(path)
                         and newest is not None and step_of(path) < newest)
        if stale_partial or path.name.startswith(TRASH_PREFIX):
            _discard(path)


def _discard(path: Path) -> None:
    """Rename away first (atomic), then delete: never a half-deleted directory marked COMPLETE."""
    if not path.name.startswith(TRASH_PREFIX):
        trash = path.with_name(f"{TRASH_PREFIX}{path.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        path = trash
    shutil.rmtree(path, ignore_errors=True)


def load(engine, ckpt: Path, *, load_optimizer: bool = True, source: Optional[ResumeSource] = None) -> dict:
    """Restore a checkpoint into the engine; returns the trainer state saved with it.

    source (engine/checkpointing/reshard.py) says where DeepSpeed reads from: the checkpoint itself, or its
    universal copy when the world size changed (the engine must then be built with load_universal).
    """
    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker)")
    load_dir, tag = (source.load_dir, source.tag) if source is not None else (ckpt.parent, ckpt.name)
    path, _ = engine.load_checkpoint(
        str(load_dir), tag=tag, load_optimizer_states=load_optimizer, load_lr_scheduler_states=load_optimizer
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {load_dir / tag}")
    state = read_trainer_state(ckpt)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: fresh RNG is fine
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
