"""discover() for each launcher's environment, the node-list expander, and fail-fast checks."""

from __future__ import annotations

import socket

import pytest

from launcher.dist_env import DistEnvError, detect_launcher, discover, expand_nodelist_python, slurm_port_for_job
from launcher.process_group import check_expected_world_size, check_port_free, init_distributed

# What each launcher exports for the second process of a 2-node x 2-process job (rank 3 of 4),
# copied from the launchers' own code (deepspeed/launcher/launch.py, torch.distributed.run,
# Open MPI's mpirun, SLURM's srun).
DEEPSPEED_NO_SSH_NODE1 = {
    "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29600", "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2",
}
TORCHRUN_NODE1 = {
    "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29601",
    "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0",
}
OPENMPI_NODE1 = {
    "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
}
SRUN_NODE1 = {
    "SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
}


def never_broadcast(value: object) -> object:
    raise AssertionError("MPI broadcast must not be needed when MASTER_ADDR is set")


def test_single_process_without_launcher_variables() -> None:
    found = discover({}, backend="gloo")
    assert (found.launcher, found.rank, found.world_size, found.local_rank) == ("single", 0, 1, 0)
    assert 0 < found.master_port < 65536


def test_deepspeed_launcher_no_ssh_second_node() -> None:
    found = discover(DEEPSPEED_NO_SSH_NODE1, backend="gloo")
    assert found.launcher == "deepspeed"
    assert (found.rank, found.local_rank, found.world_size) == (3, 1, 4)
    assert (found.node_rank, found.local_world_size) == (1, 2)
    assert (found.master_addr, found.master_port) == ("10.0.0.1", 29600)


def test_torchrun_second_node() -> None:
    found = discover(TORCHRUN_NODE1, backend="gloo")
    assert found.launcher == "torchrun"
    assert (found.rank, found.local_rank, found.world_size, found.node_rank) == (3, 1, 4, 1)
    assert (found.master_addr, found.master_port) == ("10.0.0.1", 29601)


def test_mpi_broadcasts_master_address_chosen_by_rank_zero() -> None:
    broadcasts: list[object] = []

    def fake_broadcast(value: object) -> object:
        broadcasts.append(value)
        return ("rank0-host", 31337)  # what rank 0 sent, as every rank receives it

    found = discover(OPENMPI_NODE1, broadcast=fake_broadcast, backend="gloo")
    assert found.launcher == "mpi"
    assert (found.rank, found.local_rank, found.world_size, found.node_rank) == (3, 1, 4, 1)
    assert (found.master_addr, found.master_port) == ("rank0-host", 31337)
    assert broadcasts == [None], "a non-zero rank contributes nothing to the broadcast"


def test_mpi_rank_zero_offers_its_hostname_and_a_free_port() -> None:
    offered: list[object] = []
    env = {**OPENMPI_NODE1, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    found = discover(env, broadcast=lambda value: offered.append(value) or value, backend="gloo")
    host, port = offered[0]
    assert host == socket.gethostname() and (found.master_addr, found.master_port) == (host, port)
    with socket.socket() as probe:
        probe.bind(("", port))  # the offered port really was free


def test_mpi_uses_exported_master_address_without_broadcast() -> None:
    env = {**OPENMPI_NODE1, "MASTER_ADDR": "head", "MASTER_PORT": "29999"}
    found = discover(env, broadcast=never_broadcast, backend="gloo")
    assert (found.master_addr, found.master_port) == ("head", 29999)


def test_mpich_pmi_variables() -> None:
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
           "MASTER_ADDR": "h"}
    found = discover(env, broadcast=never_broadcast, backend="gloo")
    assert (found.launcher, found.rank, found.world_size, found.local_rank) == ("mpi", 1, 2, 1)


def test_srun_task_uses_first_node_and_job_port() -> None:
    found = discover(SRUN_NODE1, expand=expand_nodelist_python, backend="gloo")
    assert found.launcher == "slurm"
    assert (found.rank, found.local_rank, found.world_size, found.node_rank) == (3, 1, 4, 1)
    assert found.local_world_size == 2
    assert found.master_addr == "gpu07"
    assert found.master_port == slurm_port_for_job(4242) != slurm_port_for_job(4243)


def test_srun_task_prefers_master_address_exported_by_batch_script() -> None:
    env = {**SRUN_NODE1, "MASTER_ADDR": "gpu08", "MASTER_PORT": "25000"}
    found = discover(env, expand=expand_nodelist_python, backend="gloo")
    assert (found.master_addr, found.master_port) == ("gpu08", 25000)


def test_sbatch_batch_shell_is_not_a_rank() -> None:
    # The batch shell has SLURM_PROCID=0 and SLURM_NTASKS but no step: `python run.py` there is
    # one process, and taking NTASKS as world size would hang waiting for absent peers.
    batch_shell = {key: value for key, value in SRUN_NODE1.items() if "STEP" not in key}
    assert detect_launcher({**batch_shell, "SLURM_PROCID": "0"}) == "single"


@pytest.mark.parametrize("outer", [SRUN_NODE1, OPENMPI_NODE1])
def test_explicit_rank_variables_win_over_outer_launchers(outer: dict[str, str]) -> None:
    # The deepspeed launcher started inside an srun step or an mpirun keeps its own ranks.
    assert detect_launcher({**outer, **DEEPSPEED_NO_SSH_NODE1}) == "deepspeed"


def test_mpirun_inside_slurm_allocation_is_mpi() -> None:
    assert detect_launcher({**SRUN_NODE1, **OPENMPI_NODE1}) == "mpi"


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("node7", ["node7"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("a[098-101]", ["a098", "a099", "a100", "a101"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("x,y[2],z", ["x", "y2", "z"]),
])
def test_expand_nodelist_python(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist_python(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu01]", "gpu[3-1]", "gpu[a-b]", ""])
def test_expand_nodelist_python_rejects_malformed(bad: str) -> None:
    with pytest.raises(DistEnvError, match="node list"):
        expand_nodelist_python(bad)


def test_missing_master_address_names_the_fix() -> None:
    env = {key: value for key, value in DEEPSPEED_NO_SSH_NODE1.items() if key != "MASTER_ADDR"}
    with pytest.raises(DistEnvError, match="MASTER_ADDR.*--master_addr"):
        discover(env, backend="gloo")


@pytest.mark.parametrize("change, message", [
    ({"RANK": "4"}, "rank 4 is outside 0..3"),
    ({"RANK": "two"}, "RANK='two' is not an integer"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ({"LOCAL_RANK": "2"}, "local rank 2"),
])
def test_inconsistent_launcher_variables_fail_fast(change: dict[str, str], message: str) -> None:
    with pytest.raises(DistEnvError, match=message):
        discover({**DEEPSPEED_NO_SSH_NODE1, **change}, backend="gloo")


def test_world_size_mismatch_names_config_key() -> None:
    found = discover(DEEPSPEED_NO_SSH_NODE1, backend="gloo")
    check_expected_world_size(found, 4, "distributed.world_size")
    with pytest.raises(DistEnvError, match="distributed.world_size=8 .* started 4"):
        check_expected_world_size(found, 8, "distributed.world_size")


def test_port_in_use_on_rank_zero_fails_fast() -> None:
    with socket.socket() as occupant:
        occupant.bind(("", 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        env = {**DEEPSPEED_NO_SSH_NODE1, "RANK": "0", "LOCAL_RANK": "0",
               "MASTER_PORT": str(port)}
        with pytest.raises(DistEnvError, match=f"MASTER_PORT={port} is already in use"):
            check_port_free(discover(env, backend="gloo"))
        # torchrun's agent owns the port on purpose; the ranks connect to its store.
        torchrun_rank0 = {**TORCHRUN_NODE1, "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0",
                          "MASTER_PORT": str(port)}
        check_port_free(discover(torchrun_rank0, backend="gloo"))


def test_init_distributed_rejects_nonpositive_timeout() -> None:
    with pytest.raises(DistEnvError, match="timeout"):
        init_distributed(discover({}, backend="gloo"), timeout_minutes=0)
