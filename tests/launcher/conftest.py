"""Fixtures for the launcher tests: a local SLURM cluster, and cleanup of what launches leave."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from tests.launcher.local_slurm import LocalSlurm, start_cluster, stop_cluster, unavailable_reason


@pytest.fixture(scope="session")
def local_slurm() -> Iterator[LocalSlurm]:
    """A running one-node cluster for the whole session; stopped by PID even on failure."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


@pytest.fixture
def launch_env(tmp_path: Path, deepspeed_ops_built: None) -> dict[str, str]:
    """Environment for launched workers: one thread each (2 shared cores) and no stray rank
    variables from whatever started pytest."""
    inherited = {key: value for key, value in os.environ.items()
                 if not key.startswith(("SLURM_", "OMPI_", "PMI", "TORCHELASTIC_"))
                 and key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                 "MASTER_PORT", "LOCAL_WORLD_SIZE", "CROSS_RANK")}
    return {**inherited, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def standin_config(tmp_path: Path) -> Path:
    """A run config for the stand-in workload; its run_dir is under the test's tmp dir."""
    config = tmp_path / "standin.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\n")
    return config
