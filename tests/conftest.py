"""Shared test setup: one thread per process, a reused DeepSpeed op cache, /dev/shm hygiene."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One BLAS thread per process: tests start several ranks on few cores, and oversubscription makes
# them several times slower. DeepSpeed compiles C++ ops on first use; a shared cache makes that a
# one-time cost per machine rather than per test.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "zhiling" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

SHM = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def _shm_buffers() -> set[str]:
    if not SHM.is_dir():
        return set()
    return {p.name for p in SHM.iterdir() if p.name.startswith(SHM_PREFIX)}


@pytest.fixture(autouse=True, scope="session")
def _clean_deepspeed_shm():
    """DeepSpeed's CPU shared-memory allreduce leaves a 66 MiB file per rank in /dev/shm and never
    removes it; remove the ones this test session created so RAM does not fill up."""
    before = _shm_buffers()
    yield
    for name in _shm_buffers() - before:
        try:
            (SHM / name).unlink()
        except FileNotFoundError:
            pass


@pytest.fixture(scope="session", autouse=True)
def deepspeed_ops_built() -> None:
    """Build DeepSpeed's CPU shared-memory all-reduce op once, in this process, before any test
    launches ranks: otherwise every rank compiles it on first use and they race for the build lock
    (a rank killed while holding it leaves a lock that hangs every later build)."""
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:  # a kernel-only run (GPU checks on a machine without DeepSpeed)
        return

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA
