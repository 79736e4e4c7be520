"""`python launcher/run.py` with no launcher: one rank, a private free port, a working group."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.launcher.workers import STANDIN, describe, read_results, remove_shm_buffers, run_together


def test_plain_python_is_a_one_rank_job(standin_config: Path, launch_env: dict[str, str]) -> None:
    launched = run_together([[sys.executable, str(STANDIN), "--config", str(standin_config)]],
                            launch_env, timeout=90)
    results = read_results(standin_config.parent / "run")
    for result in results:
        remove_shm_buffers(result["master_port"])
    assert launched[0].returncode == 0, describe(launched)
    assert [(r["launcher"], r["rank"], r["world_size"], r["sum"]) for r in results] == \
        [("single", 0, 1, 1.0)]
