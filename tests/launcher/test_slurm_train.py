"""The real trainer under SLURM: the generated sbatch script, 2 srun tasks, a real training run
that gets the pre-time-limit signal mid-run, checkpoints, is requeued and resumes to the end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.dist_env import slurm_port_for_job
from tests.integration.tiny_run import read_metrics, tiny_config, write_config
from tests.launcher.local_slurm import LocalSlurm
from tests.launcher.test_slurm_cluster import TERMINAL, job_log
from tests.launcher.workers import REPO_ROOT, remove_shm_buffers

pytestmark = pytest.mark.distributed


def _wait_for_step(run_dir: Path, step: int, cluster: LocalSlurm, job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["step"] >= step
                                    for line in metrics.read_text().splitlines() if line.strip()):
            return
        if cluster.job_fields(job_id).get("JobState") in TERMINAL:
            break
        time.sleep(0.5)
    pytest.fail(f"training never reached step {step}:\n{job_log(run_dir)[-5000:]}")


def test_training_job_is_signalled_requeued_and_resumes(local_slurm: LocalSlurm, tmp_path: Path,
                                                        launch_env: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    # Checkpoints only at the end or on a signal: the resume point is the signal's step.
    cfg = tiny_config(run_dir, max_steps=60, checkpoint={"every_steps": 0, "keep_last": 2},
                      log={"sample_prompts": []})
    config = write_config(tmp_path / "slurm_run.yaml", cfg)
    submit = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launcher" / "slurm.py"), "--config", str(config), "--nodes", "1",
         "--gpus-per-node", "0", "--tasks-per-node", "2", "--python", sys.executable, "--time", "20", "--submit"],
        env={**launch_env, "SLURM_CONF": str(local_slurm.conf)}, cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = re.search(r"^submitted job (\d+)$", submit.stdout, re.MULTILINE)[1]
    try:
        _wait_for_step(run_dir, 3, local_slurm, job_id, timeout=240)
        # What SLURM does `--signal-seconds` before the time limit: SIGUSR1 to the batch shell.
        local_slurm.run("scancel", "--signal=USR1", "--batch", job_id)
        state = local_slurm.wait_for_job(job_id, TERMINAL, timeout=300)
        log = job_log(run_dir)
        assert state["JobState"] == "COMPLETED", log[-5000:]
        assert state["Restarts"] == "1", log[-5000:]
        resumed = re.search(r"resumed from \S+ at step (\d+)", log)
        assert resumed and int(resumed[1]) >= 3, log[-5000:]
        # The first run logged steps 1..k and saved at k on the signal; the second logged k+1..60:
        # nothing repeated, nothing skipped.
        assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 61))
        assert (run_dir / "export" / "model.safetensors").is_file()
        assert not (run_dir / "PREEMPTED").exists()
        assert "resumed from" in log
    finally:
        local_slurm.run("scancel", job_id, check=False)
        remove_shm_buffers(slurm_port_for_job(int(job_id)))
