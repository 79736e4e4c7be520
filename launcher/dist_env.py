"""Find this process's place in the job, whichever launcher started it, then join the process group.

Every launcher describes the job in its own environment variables. `discover()` reads them into
one `DistEnv`; `init_distributed()` exports the torch `env://` variables from it and calls
`deepspeed.init_distributed`, so the trainer never cares how it was started:

    launcher   recognised by                     rank / local rank / world size from
    ---------  --------------------------------  ------------------------------------------------
    torchrun   TORCHELASTIC_RUN_ID + RANK        RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK, ...
    deepspeed  RANK + WORLD_SIZE                 RANK, LOCAL_RANK, WORLD_SIZE, CROSS_RANK, ...
    mpi        OMPI_COMM_WORLD_RANK / PMI_RANK   OMPI_COMM_WORLD_* (Open MPI), PMI_* (MPICH, Intel)
    slurm      SLURM_PROCID + SLURM_STEP_ID      SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS
    single     none of the above                 rank 0 of 1

The order matters: `mpirun` inside a SLURM allocation starts its daemons through srun, so MPI
ranks also carry SLURM step variables (MPI wins); the deepspeed launcher run inside an sbatch
script inherits SLURM_PROCID=0 of the batch shell (RANK wins). A SLURM batch shell itself is not
an srun task (no SLURM_STEP_ID), so `python launcher/run.py` in an sbatch script is "single".

Master address: taken from MASTER_ADDR when the launcher or the sbatch script sets it; for SLURM
otherwise the first host of the step's node list; for MPI otherwise rank 0's hostname and a free
port chosen by rank 0, both broadcast through mpi4py (no launcher variable carries them).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional

LAUNCHERS = ("deepspeed", "torchrun", "mpi", "slurm", "single")

# Same formula as the sbatch script written by launcher/slurm.py: a requeued job keeps its job id,
# so it keeps its port, and two jobs sharing a first node rarely collide.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000

DEFAULT_MASTER_PORT = 29500

EnvReader = Mapping[str, str]


class DistEnvError(RuntimeError):
    """The launcher environment is incomplete or inconsistent. The message says what to fix."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; everything `torch.distributed` needs to join it."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """Which launcher started the process: one of LAUNCHERS."""
    backend: str
    """"nccl" when CUDA is available, else "gloo"."""

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def torch_env_vars(self) -> dict[str, str]:
        """The variables torch's `env://` rendezvous reads (and DeepSpeed checks for)."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


# ---------------------------------------------------------------------------------------------
# Reading variables


def _int_var(env: EnvReader, name: str, launcher: str, default: Optional[int] = None) -> int:
    """Read an integer variable; say which launcher should have set it when it is wrong."""
    raw = env.get(name)
    if raw is None or raw == "":
        if default is not None:
            return default
        raise DistEnvError(f"{launcher} launch: environment variable {name} is not set; "
                           f"start the process through the {launcher} launcher or export {name}")
    try:
        return int(raw)
    except ValueError:
        raise DistEnvError(f"{launcher} launch: environment variable {name}={raw!r} "
                           f"is not an integer") from None


def _first_int_var(env: EnvReader, names: tuple[str, ...], launcher: str,
                   default: Optional[int] = None) -> int:
    """Read the first of several spellings that is set (MPI implementations disagree)."""
    for name in names:
        if env.get(name):
            return _int_var(env, name, launcher)
    if default is not None:
        return default
    raise DistEnvError(f"{launcher} launch: none of {', '.join(names)} is set")


def _master_port(env: EnvReader, launcher: str, default: int) -> int:
    port = _int_var(env, "MASTER_PORT", launcher, default=default)
    if not 0 < port < 65536:
        raise DistEnvError(f"{launcher} launch: MASTER_PORT={port} is outside 1..65535")
    return port


def default_backend() -> str:
    import torch  # deferred: discovery itself is torch-free and cheap to unit-test

    return "nccl" if torch.cuda.is_available() else "gloo"


# ---------------------------------------------------------------------------------------------
# SLURM node lists

_BRACKET_GROUP = re.compile(r"^(?P<prefix>[^\[\],]*)\[(?P<ranges>[^\]]+)\](?P<rest>.*)$")


def _split_top_level(nodelist: str) -> list[str]:
    """Split `a[1-2],b,c[3,5]` on the commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(nodelist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise DistEnvError(f"SLURM node list {nodelist!r}: unmatched ']' at {index}")
        elif char == "," and depth == 0:
            parts.append(nodelist[start:index])
            start = index + 1
    if depth != 0:
        raise DistEnvError(f"SLURM node list {nodelist!r}: unmatched '['")
    parts.append(nodelist[start:])
    return [part for part in parts if part]


def _expand_range(item: str, nodelist: str) -> list[str]:
    """`07` -> [`07`]; `01-03` -> [`01`, `02`, `03`], keeping the zero padding of the start."""
    low, sep, high = item.partition("-")
    if not low.isdigit() or (sep and not high.isdigit()):
        raise DistEnvError(f"SLURM node list {nodelist!r}: bad range {item!r}")
    if not sep:
        return [low]
    if int(high) < int(low):
        raise DistEnvError(f"SLURM node list {nodelist!r}: descending range {item!r}")
    width = len(low)
    return [str(number).zfill(width) for number in range(int(low), int(high) + 1)]


def _expand_host_pattern(pattern: str, nodelist: str) -> list[str]:
    """Expand one host pattern; several bracket groups (`r[1-2]n[1-2]`) form a product."""
    match = _BRACKET_GROUP.match(pattern)
    if match is None:
        return [pattern]
    suffixes = _expand_host_pattern(match["rest"], nodelist) if match["rest"] else [""]
    hosts = []
    for item in match["ranges"].split(","):
        for number in _expand_range(item.strip(), nodelist):
            hosts.extend(match["prefix"] + number + suffix for suffix in suffixes)
    return hosts


def expand_nodelist_python(nodelist: str) -> list[str]:
    """Expand a SLURM host list like `gpu[01-03,07],cpu5` to host names, in order."""
    hosts = []
    for pattern in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_host_pattern(pattern, nodelist))
    if not hosts:
        raise DistEnvError(f"SLURM node list {nodelist!r} names no host")
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand with `scontrol show hostnames` when it exists (authoritative), else in Python."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                                text=True, timeout=30, check=False)
        hosts = result.stdout.split()
        if result.returncode == 0 and hosts:
            return hosts
    return expand_nodelist_python(nodelist)


# ---------------------------------------------------------------------------------------------
# One reader per launcher. Each returns a DistEnv without the backend (filled in by discover()).


def _from_env_launcher(env: EnvReader, launcher: str) -> DistEnv:
    """torchrun and the deepspeed launcher both export the torch env:// variables."""
    world_size = _int_var(env, "WORLD_SIZE", launcher)
    local_world_size = _first_int_var(env, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"), launcher,
                                      default=world_size)
    master_addr = env.get("MASTER_ADDR", "")
    if not master_addr and world_size > 1:
        raise DistEnvError(f"{launcher} launch: MASTER_ADDR is not set; pass --master_addr to "
                           f"the launcher (the address of the node running rank 0)")
    return DistEnv(
        rank=_int_var(env, "RANK", launcher),
        local_rank=_int_var(env, "LOCAL_RANK", launcher, default=0),
        world_size=world_size,
        local_world_size=local_world_size,
        # torchrun calls the node rank GROUP_RANK; the deepspeed launcher calls it CROSS_RANK.
        node_rank=_first_int_var(env, ("GROUP_RANK", "CROSS_RANK", "NODE_RANK"), launcher,
                                 default=0),
        master_addr=master_addr or "127.0.0.1",
        master_port=_master_port(env, launcher, DEFAULT_MASTER_PORT),
        launcher=launcher,
        backend="",
    )


def slurm_port_for_job(job_id: int) -> int:
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _from_slurm(env: EnvReader, expand: Callable[[str], list[str]]) -> DistEnv:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    master_addr = env.get("MASTER_ADDR", "")
    if not master_addr:
        if not nodelist:
            raise DistEnvError("slurm launch: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set; "
                               "export MASTER_ADDR in the sbatch script")
        master_addr = expand(nodelist)[0]
    job_id = _int_var(env, "SLURM_JOB_ID", "slurm", default=0)
    world_size = _first_int_var(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"), "slurm")
    local_world_size = _local_task_count(env, world_size)
    return DistEnv(
        rank=_int_var(env, "SLURM_PROCID", "slurm"),
        local_rank=_int_var(env, "SLURM_LOCALID", "slurm"),
        world_size=world_size,
        local_world_size=local_world_size,
        node_rank=_int_var(env, "SLURM_NODEID", "slurm", default=0),
        master_addr=master_addr,
        master_port=_master_port(env, "slurm", slurm_port_for_job(job_id)),
        launcher="slurm",
        backend="",
    )


def _local_task_count(env: EnvReader, world_size: int) -> int:
    """SLURM_STEP_TASKS_PER_NODE looks like `2(x3),1`; this node's entry is at SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
    counts: list[int] = []
    for item in filter(None, spec.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            raise DistEnvError(f"slurm launch: cannot parse SLURM_STEP_TASKS_PER_NODE={spec!r}")
        counts.extend([int(match[1])] * int(match[2] or 1))
    node_id = _int_var(env, "SLURM_NODEID", "slurm", default=0)
    return counts[node_id] if node_id < len(counts) else world_size


def _from_mpi(env: EnvReader, broadcast: Callable[[object], object]) -> DistEnv:
    rank = _first_int_var(env, ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"), "mpi")
    world_size = _first_int_var(env, ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"), "mpi")
    local_rank = _first_int_var(env, ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"), "mpi",
                                default=0)
    local_world_size = _first_int_var(env, ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"),
                                      "mpi", default=world_size)
    master_addr = env.get("MASTER_ADDR", "")
    if master_addr:
        master_port = _master_port(env, "mpi", DEFAULT_MASTER_PORT)
    else:
        # Only rank 0 knows where the rendezvous store will listen: it picks, everyone learns.
        chosen = (socket.gethostname(), find_free_port()) if rank == 0 else None
        master_addr, master_port = broadcast(chosen)  # type: ignore[misc]
    return DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        node_rank=rank // max(local_world_size, 1),
        master_addr=master_addr,
        master_port=master_port,
        launcher="mpi",
        backend="",
    )


def _single_process(env: EnvReader) -> DistEnv:
    """A plain `python launcher/run.py`: a one-rank group still needs a store port, and a fixed
    default would collide with any other single-process run on the same machine."""
    port = _master_port(env, "single", DEFAULT_MASTER_PORT) if env.get("MASTER_PORT") \
        else find_free_port()
    return DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                   master_addr=env.get("MASTER_ADDR") or "127.0.0.1", master_port=port,
                   launcher="single", backend="")


def mpi4py_broadcast(value: object) -> object:
    """Broadcast from MPI rank 0 through mpi4py; raises with the fix when mpi4py is missing."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise DistEnvError("mpi launch without MASTER_ADDR needs mpi4py to agree on the master "
                           "address: pip install mpi4py, or run `mpirun -x MASTER_ADDR=<host of "
                           "rank 0> -x MASTER_PORT=<port> ...`") from error
    return MPI.COMM_WORLD.bcast(value, root=0)


def find_free_port() -> int:
    """A port the OS considers free now. Another process could still take it before the store
    binds it; the rendezvous then fails with "address in use" rather than hanging."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Discovery


def detect_launcher(env: EnvReader) -> str:
    """Name the launcher that started this process (see the module docstring for the order)."""
    if env.get("TORCHELASTIC_RUN_ID") and env.get("RANK"):
        return "torchrun"
    if env.get("RANK") and env.get("WORLD_SIZE"):
        return "deepspeed"
    if env.get("OMPI_COMM_WORLD_RANK"):
        return "mpi"
    if env.get("SLURM_PROCID") and env.get("SLURM_STEP_ID"):
        return "slurm"
    if env.get("PMI_RANK") or env.get("PMIX_RANK"):
        return "mpi"
    return "single"


def discover(env: Optional[EnvReader] = None, *,
             expand: Callable[[str], list[str]] = expand_nodelist,
             broadcast: Callable[[object], object] = mpi4py_broadcast,
             backend: Optional[str] = None) -> DistEnv:
    """Read rank, local rank, world size and master address from the launcher's environment.

    `env` defaults to os.environ; `expand` and `broadcast` are injectable so that the SLURM and
    MPI paths are testable without a cluster. `backend` defaults to nccl on CUDA, else gloo.
    """
    env = os.environ if env is None else env
    launcher = detect_launcher(env)
    if launcher in ("torchrun", "deepspeed"):
        found = _from_env_launcher(env, launcher)
    elif launcher == "slurm":
        found = _from_slurm(env, expand)
    elif launcher == "mpi":
        found = _from_mpi(env, broadcast)
    else:
        found = _single_process(env)
    validate(found)
    return replace(found, backend=backend or default_backend())


def validate(found: DistEnv) -> None:
    """Reject impossible combinations before any process blocks waiting for its peers."""
    where = f"{found.launcher} launch"
    if found.world_size < 1:
        raise DistEnvError(f"{where}: world size {found.world_size} must be at least 1")
    if not 0 <= found.rank < found.world_size:
        raise DistEnvError(f"{where}: rank {found.rank} is outside 0..{found.world_size - 1}")
    if not 0 <= found.local_rank < max(found.local_world_size, 1):
        raise DistEnvError(f"{where}: local rank {found.local_rank} is outside "
                           f"0..{found.local_world_size - 1}")
