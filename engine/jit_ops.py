"""Say so before DeepSpeed compiles a C++ op: the first run on a machine otherwise sits silent for
one or two minutes while ninja builds it (the CPU shared-memory all-reduce when the process group
starts, cpu_adam or fused_adam when the engine is built).

DeepSpeed builds an op with torch's JIT extension loader unless it was installed prebuilt; the
result is cached as <extensions dir>/<op>/<op>.so, so each op is built once per machine (per
Python and torch build). `uncached_ops` tells which of the ops a run needs are not there yet.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

import deepspeed.ops
from deepspeed.git_version_info import installed_ops as DS_INSTALLED_OPS

from engine.kernels.cpu.extension import extensions_root

SHM_COMM_OP = "deepspeed_shm_comm"
CPU_ADAM_OP = "cpu_adam"
FUSED_ADAM_OP = "fused_adam"


def is_cached(op: str, root: Path) -> bool:
    return (Path(root) / op / f"{op}.so").is_file()


def uncached_ops(ops: Iterable[str], root: Optional[Path] = None, prebuilt: Optional[dict] = None) -> list[str]:
    """The ops of `ops` that DeepSpeed will compile: neither installed prebuilt nor in the cache."""
    root = extensions_root() if root is None else Path(root)
    prebuilt = DS_INSTALLED_OPS if prebuilt is None else prebuilt
    return [op for op in ops if not prebuilt.get(op, False) and not is_cached(op, root)]


def optimizer_ops(ds_config: dict) -> list[str]:
    """The C++ optimizer DeepSpeed will build for this config, if any: its Adam/AdamW without
    torch_adam is cpu_adam under optimizer offload, else fused_adam."""
    opt = ds_config.get("optimizer") or {}
    if str(opt.get("type", "")).lower() not in ("adam", "adamw") or (opt.get("params") or {}).get("torch_adam"):
        return []
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return [CPU_ADAM_OP] if offload.get("device") in ("cpu", "nvme") else [FUSED_ADAM_OP]


def comm_ops(on_cuda: bool) -> list[str]:
    """On the CPU accelerator DeepSpeed's process group loads its shared-memory all-reduce op
    (where it can build it at all)."""
    if on_cuda or not getattr(deepspeed.ops, "__compatible_ops__", {}).get(SHM_COMM_OP, False):
        return []
    return [SHM_COMM_OP]


def build_notices(ops: Iterable[str], root: Optional[Path] = None, prebuilt: Optional[dict] = None) -> list[str]:
    root = extensions_root() if root is None else Path(root)
    return [f"building DeepSpeed's {op} C++ op (first run only, ~1-2 min; cached in {root / op})"
            for op in uncached_ops(ops, root, prebuilt)]


def remove_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce leaves a 66 MiB file per rank in /dev/shm and never
    removes it. Call after a final barrier: every peer has long mapped this rank's file, so
    unlinking it frees the memory once the processes exit. (Not after an error: a peer still
    starting up would wait for the file forever.)"""
    port, addr = os.environ.get("MASTER_PORT"), os.environ.get("MASTER_ADDR")
    if not port or not addr:
        return
    shm = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    try:
        shm.unlink()
    except (FileNotFoundError, PermissionError):
        pass
