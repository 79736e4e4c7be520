"""Join the process group that `launcher.dist_env.discover()` described, checking first what can fail fast.

Rank 0 checks that the rendezvous port is free and every rank that the launcher started the world
size the config expects, before anyone blocks waiting for peers; then the torch `env://` variables
are exported, each NCCL rank is bound to its GPU, and `deepspeed.init_distributed` joins, with
`dist_timeout_minutes` bounding every collective so that a dead peer becomes an error, not a hang.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Optional

from launcher.dist_env import DistEnv, DistEnvError


def check_expected_world_size(found: DistEnv, expected: Optional[int],
                              config_key: str = "world_size") -> None:
    """Fail fast when the config pins a world size that the launcher did not start."""
    if expected is None or expected == found.world_size:
        return
    raise DistEnvError(f"config key {config_key}={expected} but the {found.launcher} launcher "
                       f"started {found.world_size} process(es); change {config_key} or the "
                       f"launcher's process count (--num_gpus/--nproc_per_node/-n/--ntasks)")


def check_port_free(found: DistEnv) -> None:
    """On rank 0, make sure the rendezvous port can be bound before peers start waiting on it.

    Skipped under torchrun: its agent already listens on MASTER_PORT and the ranks reuse it.
    """
    if found.rank != 0 or not found.is_distributed or found.launcher == "torchrun":
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", found.master_port))
        except OSError as error:
            raise DistEnvError(f"{found.launcher} launch: MASTER_PORT={found.master_port} is "
                               f"already in use on rank 0's host ({error.strerror}); pick another "
                               f"port (--master_port, or export MASTER_PORT)") from None


def _bind_cuda_device(found: DistEnv) -> None:
    """NCCL needs each rank on its own GPU before the first collective."""
    import torch

    count = torch.cuda.device_count()
    if found.local_rank < count:
        torch.cuda.set_device(found.local_rank)
    elif count == 1:  # the launcher already narrowed CUDA_VISIBLE_DEVICES to one GPU per task
        torch.cuda.set_device(0)
    else:
        raise DistEnvError(f"{found.launcher} launch: local rank {found.local_rank} but only "
                           f"{count} visible GPU(s); start one process per GPU")


def init_distributed(found: DistEnv, timeout_minutes: float,
                     expected_world_size: Optional[int] = None,
                     world_size_key: str = "world_size") -> None:
    """Export the env:// variables, join the process group and check that everyone arrived.

    `timeout_minutes` bounds every collective (and the rendezvous): a dead peer turns into an
    error after that long instead of a hang until the job's time limit.
    """
    if timeout_minutes <= 0:
        raise DistEnvError(f"collective timeout must be positive minutes, got {timeout_minutes}")
    check_expected_world_size(found, expected_world_size, world_size_key)
    check_port_free(found)
    os.environ.update(found.torch_env_vars())
    if found.backend == "nccl":
        _bind_cuda_device(found)

    import deepspeed
    import torch.distributed as torch_dist

    deepspeed.init_distributed(dist_backend=found.backend, auto_mpi_discovery=False,
                               timeout=timedelta(minutes=timeout_minutes), verbose=False)
    joined = torch_dist.get_world_size()
    if joined != found.world_size:
        raise DistEnvError(f"{found.launcher} launch: process group has {joined} ranks but the "
                           f"launcher announced {found.world_size}")
