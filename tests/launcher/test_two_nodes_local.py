"""Two "nodes" on one machine: each launcher started twice with --node_rank 0 and 1, one process
per node, as an operator would start them by hand on two hosts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from launcher.dist_env import find_free_port
from tests.launcher.workers import STANDIN, describe, read_results, remove_shm_buffers, run_together

pytestmark = pytest.mark.distributed


def assert_two_node_results(run_dir: Path, launcher: str, launched: list) -> None:
    assert all(result.returncode == 0 for result in launched), describe(launched)
    results = read_results(run_dir)
    assert [result["rank"] for result in results] == [0, 1], describe(launched)
    for result in results:
        assert result["launcher"] == launcher
        assert result["node_rank"] == result["rank"], "one process per node: node rank = rank"
        assert (result["local_rank"], result["local_world_size"]) == (0, 1)
        assert (result["world_size"], result["sum"]) == (2, 3.0)


def test_torchrun_two_nodes(standin_config: Path, launch_env: dict[str, str]) -> None:
    port = find_free_port()
    commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                 "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                 "--master_port", str(port), str(STANDIN), "--config", str(standin_config)]
                for node in (0, 1)]
    try:
        launched = run_together(commands, launch_env, timeout=120)
    finally:
        remove_shm_buffers(port)
    assert_two_node_results(standin_config.parent / "run", "torchrun", launched)


def test_deepspeed_hostfile_no_ssh_two_nodes(standin_config: Path, tmp_path: Path,
                                             launch_env: dict[str, str]) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only; --no_ssh never dials
    port = find_free_port()
    commands = [[sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                 "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1",
                 "--master_port", str(port), str(STANDIN), "--config", str(standin_config)]
                for node in (0, 1)]
    try:
        launched = run_together(commands, launch_env, timeout=150)
    finally:
        remove_shm_buffers(port)
    assert_two_node_results(standin_config.parent / "run", "deepspeed", launched)
