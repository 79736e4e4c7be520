"""Preemption and kills in one run directory, ending on another world size:

  1. a 2-rank job gets SIGUSR1 (to its rank processes) after step 2: it saves at the next step
     boundary, writes PREEMPTED and exits 0;
  2. the relaunched 2-rank job is SIGKILLed (launcher and ranks at once) while a checkpoint is
     being written (checkpoint.every_steps=1; we poll for a step directory without COMPLETE);
  3. the next 2-rank job is SIGKILLed at a random moment (seeded: a random number of steps after
     its resume, then a random delay within a step);
  4. a 1-rank job resumes from the newest *complete* checkpoint and finishes.

Every relaunch must announce that it resumed from the checkpoint `latest` named before it started.

The run's per-step losses and global sample ids equal the uninterrupted 2-rank run's (tolerance
argued in test_resume_world_size.py).
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from engine.checkpointing import checkpoint
from tests.integration.lifecycle import (LOSS_RTOL, MAX_STEPS, global_sample_ids, lifecycle_config, logged_steps,
                                         losses_by_step, read_ckpt_step, reference_run, run, start, wait_until,
                                         write_config)

pytestmark = [pytest.mark.distributed]


KILL_SEED = 20240601


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory.mktemp("lifecycle"))


def _partial_save(root, after_step: int):
    """A checkpoint directory newer than after_step whose COMPLETE marker is not written yet."""
    if not root.is_dir():
        return None
    for path in root.iterdir():
        if (path.name.startswith(checkpoint.TAG_PREFIX) and path.is_dir() and not checkpoint.is_complete(path)
                and checkpoint.step_of(path) > after_step):
            return path
    return None


def _assert_resumed_from(log_path, root, step: int) -> None:
    text = log_path.read_text(encoding="utf-8", errors="replace")
    assert f"resumed from {root / checkpoint.tag_for(step)} at step {step}" in text, text[-4000:]


def _assert_latest_is_complete(root) -> int:
    step = checkpoint.step_of(checkpoint.find_latest(root))
    latest = (root / checkpoint.LATEST).read_text().strip()
    assert checkpoint.is_complete(root / latest), f"`latest` names the partial checkpoint {latest}"
    return step


def test_sigusr1_then_sigkills_then_resume_on_one_rank(reference, tmp_path):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    config = write_config(tmp_path / "run.yaml", lifecycle_config(run_dir, checkpoint={"every_steps": 1}))

    # 1. preemption notice
    job = start(config, num_procs=2, log=tmp_path / "preempted.log")
    assert wait_until(lambda: len(logged_steps(run_dir)) >= 2, job, poll=0.05), job.explain()
    pids = job.rank_pids()
    assert len(pids) == 2, f"expected 2 rank processes, found {pids}"
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    assert job.wait() == 0, job.explain()
    preempted_at = int((run_dir / "PREEMPTED").read_text().strip())
    assert read_ckpt_step(run_dir) == preempted_at and preempted_at < MAX_STEPS

    # 2. SIGKILL in the middle of a save
    job = start(config, num_procs=2, log=tmp_path / "killed_mid_save.log")
    hit = wait_until(lambda: _partial_save(root, preempted_at + 1) is not None, job)
    job.kill()
    assert hit, f"the job ended before a save could be interrupted\n{job.explain()}"
    _assert_resumed_from(job.log, root, preempted_at)
    resume_step = _assert_latest_is_complete(root)

    # 3. SIGKILL at a random moment
    rng = random.Random(KILL_SEED)
    kill_after = resume_step + rng.randint(1, 3)
    already_logged = len(logged_steps(run_dir))  # metrics.jsonl is appended across launches
    job = start(config, num_procs=2, log=tmp_path / "killed_random.log")
    wait_until(lambda: max(logged_steps(run_dir)[already_logged:], default=0) >= kill_after, job, poll=0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    job.kill()
    _assert_resumed_from(job.log, root, resume_step)
    resume_step = _assert_latest_is_complete(root)
    assert resume_step < MAX_STEPS, "the job finished before the kill; kill earlier"

    # 4. resume on one rank and finish
    job = run(config, num_procs=1, log=tmp_path / "resumed.log")
    assert job.proc.returncode == 0, job.explain()
    _assert_resumed_from(job.log, root, resume_step)
    assert read_ckpt_step(run_dir) == MAX_STEPS

    assert global_sample_ids(run_dir) == global_sample_ids(reference)
    losses, expected = losses_by_step(run_dir), losses_by_step(reference)
    assert sorted(losses) == sorted(expected) == list(range(1, MAX_STEPS + 1))
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], rel=LOSS_RTOL), f"step {step}"
