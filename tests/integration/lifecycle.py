"""Run-lifecycle test helpers: one shared uninterrupted reference run, background launches that
can be signalled or killed, and the per-step sample-id join.

The reference run is computed once per pytest process (it is the most expensive part) and shared by
the world-size, kill and export tests: they all use the same schedule (max_steps, seed, data), and
only benign keys (checkpoint cadence, stop_at_step, export) differ.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tests.integration.tiny_run import REPO_ROOT, RUN_PY, free_port, launch_env, tiny_config, write_config

MAX_STEPS = 12
# fp32, same global batch, only the reduction order differs: see test_resume_world_size.py.
LOSS_RTOL = 1e-5
STAGE = "zero3"  # the hardest case for re-partitioning and export: parameters are sharded too

_REFERENCE: dict[str, Path] = {}


def lifecycle_config(run_dir: Path, **sections) -> dict:
    base = {
        "train": {"max_steps": MAX_STEPS},
        "checkpoint": {"every_steps": 4, "keep_last": 3, "export_at_end": False},
        "data": {"log_sample_ids": True},
        "log": {"sample_prompts": [], "tensorboard": False},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return tiny_config(run_dir, zero=STAGE, max_steps=MAX_STEPS, **base)


@dataclass
class Launch:
    """A training job started in the background, in its own process group."""

    proc: subprocess.Popen
    port: int
    log: Path

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.release()

    def kill(self) -> None:
        """SIGKILL the launcher and every rank at once (a node failure / OOM-killer)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait()

    def rank_pids(self) -> list[int]:
        import psutil

        kids = psutil.Process(self.proc.pid).children(recursive=True)
        # The rank processes are the ones the deepspeed launcher gave --local_rank (its own
        # per-node launch.py also names run.py on its command line).
        return [p.pid for p in kids if any(part.startswith("--local_rank") for part in p.cmdline())]

    def release(self) -> None:
        """Remove the shared-memory all-reduce buffers a killed job could not unlink."""
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{self.port}_*"):
            leftover.unlink(missing_ok=True)

    def explain(self) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.is_file() else ""
        return f"exit {self.proc.returncode}\n--- log tail ---\n{text[-6000:]}"


def start(config: Path, *overrides: str, num_procs: int, log: Path) -> Launch:
    """2+ ranks through the deepspeed launcher; 1 rank as a plain `python launcher/run.py`."""
    port = free_port()
    if num_procs > 1:
        cmd = ["deepspeed", "--num_gpus", str(num_procs), "--master_port", str(port), str(RUN_PY)]
    else:
        cmd = [sys.executable, str(RUN_PY)]
    env = launch_env()
    env["MASTER_PORT"] = str(port)
    env["PYTHONUNBUFFERED"] = "1"  # a SIGKILLed launcher must not take its buffered log with it
    out = open(log, "w", encoding="utf-8")
    proc = subprocess.Popen([*cmd, "--config", str(config), *overrides], cwd=REPO_ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT, process_group=0)
    out.close()
    return Launch(proc, port, log)


def run(config: Path, *overrides: str, num_procs: int, log: Path, timeout: float = 300) -> Launch:
    launch = start(config, *overrides, num_procs=num_procs, log=log)
    launch.wait(timeout)
    return launch


def wait_until(condition: Callable[[], bool], launch: Launch, *, timeout: float = 240, poll: float = 0.005) -> bool:
    """Poll until condition() holds; False if the job ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if launch.proc.poll() is not None:
            return condition()
        time.sleep(poll)
    raise TimeoutError(f"condition not reached in {timeout}s\n{launch.explain()}")


def logged_steps(run_dir: Path) -> list[int]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written
    return steps


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The last logged loss of every step (a step re-done after a resume overwrites the killed one)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if "train/loss" in record:
                out[record["step"]] = record["train/loss"]
    return out


def global_sample_ids(run_dir: Path) -> dict[int, list[tuple[int, int]]]:
    """step -> the global batch's (source, sample) ids, sorted, from the rank logs. Sorted: which
    rank trains which sample of a global batch depends on the geometry (data.balance_micro_batches
    deals rows by tokens), the samples of the step do not.

    Appended logs hold every attempt; the attempt that counts for a step is the last one, and a
    step's batch is complete when it has one record per rank of that attempt's world size.
    """
    attempts: dict[int, dict[int, dict]] = {}
    for path in sorted((Path(run_dir) / "sample_ids").glob("rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                attempts.setdefault(record["step"], {})[record["rank"]] = record
    out = {}
    for step, by_rank in attempts.items():
        # A 1-rank attempt after a 2-rank one leaves a stale rank-1 record: keep the ranks of the
        # attempt recorded by rank 0, which every attempt has.
        world = by_rank[0]["world_size"]
        out[step] = sorted(tuple(x) for r in range(world) for x in by_rank[r]["ids"]) if all(
            r in by_rank for r in range(world)) else []
    return out


def reference_run(base: Path) -> Path:
    """The uninterrupted 2-rank run (once per pytest process), with an in-process export at the end."""
    if "run_dir" not in _REFERENCE:
        run_dir = base / "reference"
        config = write_config(base / "reference.yaml",
                              lifecycle_config(run_dir, checkpoint={"export_at_end": True}))
        launch = run(config, num_procs=2, log=base / "reference.log")
        if launch.proc.returncode != 0:
            raise RuntimeError(f"reference run failed\n{launch.explain()}")
        _REFERENCE["run_dir"] = run_dir
    return _REFERENCE["run_dir"]


def read_ckpt_step(run_dir: Path) -> Optional[int]:
    from engine.checkpointing import checkpoint

    latest = checkpoint.find_latest(Path(run_dir) / "checkpoints")
    return None if latest is None else checkpoint.step_of(latest)


__all__ = ["LOSS_RTOL", "Launch", "MAX_STEPS", "global_sample_ids", "lifecycle_config", "logged_steps",
           "losses_by_step", "read_ckpt_step", "reference_run", "run", "start", "wait_until", "write_config"]
