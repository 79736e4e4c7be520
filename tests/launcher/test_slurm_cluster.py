"""Scripts from launcher/slurm.py, submitted to a real local SLURM cluster with 2 tasks.

The stand-in workload replaces launcher/run.py (through --entry), so these tests prove the launch
path itself: submission, rank discovery under srun, a gloo all-reduce across the tasks, the
time-limit signal reaching every task through the batch shell's trap, and requeue + resume.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.dist_env import expand_nodelist_python, slurm_port_for_job
from tests.launcher.local_slurm import LocalSlurm
from tests.launcher.workers import REPO_ROOT, STANDIN, read_results, remove_shm_buffers

pytestmark = pytest.mark.distributed

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def submit_standin(cluster: LocalSlurm, config: Path, env: dict[str, str],
                   *extra: str) -> tuple[str, str]:
    """Run `launcher/slurm.py ... --submit` as a user would; return (job id, its stdout)."""
    command = [sys.executable, str(REPO_ROOT / "launcher" / "slurm.py"), "--config", str(config),
               "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
               "--entry", str(STANDIN), "--python", sys.executable, "--submit", *extra]
    result = subprocess.run(command, env={**env, "SLURM_CONF": str(cluster.conf)},
                            cwd=config.parent, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"^submitted job (\d+)$", result.stdout, re.MULTILINE)[1]
    return job_id, result.stdout


def job_log(run_dir: Path) -> str:
    return "\n".join(path.read_text() for path in (run_dir / "slurm").glob("*.log"))


def test_scontrol_expands_like_the_python_expander(local_slurm: LocalSlurm) -> None:
    nodelist = "gpu[01-03,07],cpu5,r[1-2]n[08-09],a[098-101]"
    shown = local_slurm.run("scontrol", "show", "hostnames", nodelist).stdout.split()
    assert shown == expand_nodelist_python(nodelist)


def test_submitted_job_discovers_two_ranks_and_all_reduces(
        local_slurm: LocalSlurm, standin_config: Path, launch_env: dict[str, str]) -> None:
    job_id, printed = submit_standin(local_slurm, standin_config, launch_env)
    run_dir = standin_config.parent / "run"
    try:
        state = local_slurm.wait_for_job(job_id, TERMINAL, timeout=90)
        assert state["JobState"] == "COMPLETED", job_log(run_dir)
        results = read_results(run_dir)
        assert [result["rank"] for result in results] == [0, 1], job_log(run_dir)
        host = socket.gethostname().split(".")[0]
        for result in results:
            assert result["launcher"] == "slurm" and result["world_size"] == 2
            assert result["local_world_size"] == 2 and result["local_rank"] == result["rank"]
            assert result["sum"] == 3.0  # 1 + 2: both ranks took part in the all-reduce
            assert (result["master_addr"], result["master_port"]) == \
                (host, slurm_port_for_job(int(job_id)))
        assert f"{run_dir}/slurm/standin-{job_id}.log" in printed
        assert f"tensorboard --logdir {run_dir}" in printed
    finally:
        remove_shm_buffers(slurm_port_for_job(int(job_id)))


def test_time_limit_signal_checkpoints_requeues_and_resumes(
        local_slurm: LocalSlurm, standin_config: Path, launch_env: dict[str, str]) -> None:
    # A 1-minute limit with the warning 50 s before it: SLURM signals the batch shell about 10 s
    # in (its timer checks are coarse, so allow for more); the stand-in waits up to 100 s.
    started = time.monotonic()
    job_id, _ = submit_standin(local_slurm, standin_config, launch_env, "--time", "1",
                               "--signal-seconds", "50", "--", "wait_for_signal=100")
    run_dir = standin_config.parent / "run"
    try:
        state = local_slurm.wait_for_job(job_id, TERMINAL, timeout=150)
        log = job_log(run_dir)
        assert state["JobState"] == "COMPLETED", log
        assert state["Restarts"] == "1", log
        first, second = read_results(run_dir, restart=0), read_results(run_dir, restart=1)
        assert [r["resumed"] for r in first] == [False, False], log
        assert [r["resumed"] for r in second] == [True, True], log
        assert all(r["sum"] == 3.0 for r in first + second)
        # Both ranks were waiting; each got SIGUSR1 and the "checkpoint" was written once.
        assert sorted(path.name for path in run_dir.glob("waiting-rank*")) == \
            ["waiting-rank0", "waiting-rank1"]
        assert (run_dir / "checkpoint.json").exists()
        # open-mode=append kept both runs in one log, in order.
        assert log.index("restart 0 on") < log.index("requeueing job") < log.index("restart 1 on")
        # The marker is the previous run's message to the batch shell, not state to carry on.
        assert not (run_dir / "PREEMPTED").exists()
        print(f"signal -> requeue -> resumed run done in {time.monotonic() - started:.1f} s")
    finally:
        remove_shm_buffers(slurm_port_for_job(int(job_id)))
