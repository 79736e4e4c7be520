"""Resume on another number of ranks: convert a ZeRO checkpoint to DeepSpeed's universal format.

ZeRO-1/2/3 save the optimizer state (fp32 master weights, Adam moments) partitioned per
data-parallel rank, and DeepSpeed refuses to load those partitions into a different data-parallel
world size. DeepSpeed's universal checkpoint (deepspeed/checkpoint/ds_to_universal.py) stores every
parameter's fp32 weight and optimizer state unpartitioned, one folder per parameter; an engine
created with `"checkpoint": {"load_universal": true}` re-slices them for its own world size. So
resume stays exact (weights, Adam moments, step counts, lr scheduler), only the partitioning changes.

ZeRO-0 keeps the whole optimizer state in the model-state file of every rank: any world size loads
it as is, and no conversion is needed.

The universal copy lives inside the checkpoint (<ckpt>/universal). It is written to a temporary
folder and renamed into place only when finished, with a DONE marker, so a kill during the
conversion leaves either nothing or a complete copy; a leftover temporary folder is removed and the
conversion redone on the next launch.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

UNIVERSAL_DIR = "universal"
DONE = "DONE"
ZERO_SHARD_GLOB = "*zero_pp_rank_*_optim_states.pt"


@dataclass(frozen=True)
class ResumeSource:
    """Where DeepSpeed loads from: engine.load_checkpoint(load_dir, tag=tag)."""

    checkpoint: Path
    """The checkpoint the run resumes from (holds trainer_state.json, RNG, COMPLETE)."""
    saved_world_size: int
    world_size: int
    universal: bool
    """True when DeepSpeed must load a universal copy (engine built with load_universal)."""

    @property
    def load_dir(self) -> Path:
        return self.checkpoint if self.universal else self.checkpoint.parent

    @property
    def tag(self) -> str:
        return UNIVERSAL_DIR if self.universal else self.checkpoint.name

    def describe(self) -> str:
        if self.saved_world_size == self.world_size:
            return f"resuming from {self.checkpoint} on {self.world_size} rank(s), as saved"
        how = ("through a universal copy (weights, optimizer and scheduler re-partitioned exactly)"
               if self.universal else "directly (ZeRO-0 keeps the optimizer state unpartitioned)")
        return (f"resuming from {self.checkpoint}, saved on {self.saved_world_size} rank(s), "
                f"on {self.world_size} rank(s) {how}")


def has_zero_partitions(ckpt: Path) -> bool:
    """Whether the optimizer state is split per data-parallel rank (ZeRO-1/2/3, bf16 optimizer)."""
    return any(Path(ckpt).glob(ZERO_SHARD_GLOB))


def saved_world_size(ckpt: Path) -> int:
    state = json.loads((Path(ckpt) / "trainer_state.json").read_text(encoding="utf-8"))
    if "world_size" not in state:
        raise KeyError(f"{ckpt}/trainer_state.json: no 'world_size' field")
    return int(state["world_size"])


def plan_resume(ckpt: Path, world_size: int) -> ResumeSource:
    """How to load `ckpt` on `world_size` ranks (no side effect; every rank computes the same)."""
    ckpt = Path(ckpt)
    saved = saved_world_size(ckpt)
    universal = saved != world_size and has_zero_partitions(ckpt)
    return ResumeSource(checkpoint=ckpt, saved_world_size=saved, world_size=world_size, universal=universal)


def is_converted(ckpt: Path) -> bool:
    return (Path(ckpt) / UNIVERSAL_DIR / DONE).is_file()


def convert_to_universal(ckpt: Path) -> Path:
    """Write <ckpt>/universal (once; reused afterwards). Call on one process only."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ckpt = Path(ckpt)
    out = ckpt / UNIVERSAL_DIR
    if is_converted(ckpt):
        return out
    tmp = ckpt / f".{UNIVERSAL_DIR}.tmp"
    for leftover in (tmp, out):  # an interrupted conversion: start over
        shutil.rmtree(leftover, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(ckpt), output_folder=str(tmp),
        # In-process and serial: the conversion is I/O bound and a process pool would re-import
        # torch in every worker; ranks are idle at a barrier meanwhile anyway.
        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
        # Our engines do not register universal-checkpoint metadata (no tensor/pipeline
        # parallelism); the converter's default one describes plain data parallelism exactly.
        inject_missing_state=True,
    )
    ds_to_universal(args)
    (tmp / DONE).write_text("ok\n", encoding="utf-8")
    tmp.rename(out)
    return out


def ds_config_for(source: Optional[ResumeSource], ds_config: dict) -> dict:
    """The DeepSpeed config to build the engine with: load_universal only when needed."""
    if source is None or not source.universal:
        return ds_config
    section = dict(ds_config.get("checkpoint", {}))
    section["load_universal"] = True
    return {**ds_config, "checkpoint": section}
