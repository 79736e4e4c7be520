"""Start launcher processes for a test, collect the stand-in's results, leave nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
STANDIN = Path(__file__).resolve().parent / "standin_workload.py"
SHM_DIR = Path("/dev/shm")


def remove_shm_buffers(master_port: int) -> None:
    """DeepSpeed's CPU all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_
    <rank>; remove only those of the given rendezvous port, i.e. of this test's run."""
    for leftover in SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{master_port}_*"):
        leftover.unlink(missing_ok=True)


def run_together(commands: Sequence[Sequence[str]], env: dict[str, str], timeout: float,
                 cwd: Path = REPO_ROOT) -> list[subprocess.CompletedProcess]:
    """Run launcher commands side by side (e.g. one per "node"); kill every process group on
    timeout or error so no worker outlives the test."""
    processes = [subprocess.Popen(list(command), env=env, cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
                 for command in commands]
    try:
        outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return [subprocess.CompletedProcess(process.args, process.returncode, output)
            for process, output in zip(processes, outputs)]


def read_results(run_dir: Path, restart: int = 0) -> list[dict]:
    """The stand-in's per-rank result files of one (re)start, ordered by rank."""
    found = [json.loads(path.read_text())
             for path in run_dir.glob(f"result-rank*-restart{restart}.json")]
    return sorted(found, key=lambda result: result["rank"])


def describe(results: Sequence[subprocess.CompletedProcess]) -> str:
    """Exit codes and the tail of each process's output, for assertion messages."""
    return "\n".join(f"--- {' '.join(map(str, result.args))[:200]} -> rc {result.returncode}\n"
                     f"{result.stdout[-3000:]}" for result in results)
