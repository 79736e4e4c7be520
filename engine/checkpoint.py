"""Checkpoints: DeepSpeed model/optimizer/scheduler states + the data position + RNG, saved atomically.

Layout under <run_dir>/checkpoints:
    step_00000100/            DeepSpeed's files for tag "step_00000100" (every rank writes its part)
        rng_rank{r}.pt        each rank's RNG states
        trainer_state.json    step, data-stream state, config fingerprint (rank 0)
        COMPLETE              written last, after every rank has finished writing
    latest                    the tag of the newest complete checkpoint (replaced atomically)

A kill at any moment leaves `latest` naming a checkpoint whose COMPLETE marker exists: the marker is
written only after a barrier that every rank reaches once its files are on disk, and `latest` is
switched with os.replace only after that. Older checkpoints are deleted only after a newer one is
complete. The checkpoint directory must be on storage that every node sees (as for DeepSpeed).
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

COMPLETE = "COMPLETE"
LATEST = "latest"
TAG_PREFIX = "step_"


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
    return (ckpt_dir / COMPLETE).is_file()


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


def save(engine, root: Path, step: int, trainer_state: dict, *, keep_last: int) -> Path:
    """Save a complete checkpoint for `step` on every rank; returns its directory."""
    root = Path(root)
    tag = tag_for(step)
    ckpt = root / tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and ckpt.exists():  # a partial leftover of an interrupted save of the same step
        shutil.rmtree(ckpt)
    _barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(rng_state(), ckpt / f"rng_rank{rank}.pt")
    if rank == 0:
        _atomic_write(ckpt / "trainer_state.json", json.dumps(trainer_state, indent=1))
    _barrier()  # every rank's files are on disk
    if rank == 0:
        _atomic_write(ckpt / COMPLETE, f"{step}\n")
        _atomic_write(root / LATEST, tag + "\n")
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return ckpt


def load(engine, ckpt: Path, *, load_optimizer: bool = True) -> dict:
    """Restore a checkpoint into the engine; returns the trainer state saved with it."""
    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker)")
    path, _ = engine.load_checkpoint(
        str(ckpt.parent), tag=ckpt.name, load_optimizer_states=load_optimizer, load_lr_scheduler_states=load_optimizer
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt}")
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: fresh RNG is fine
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
