"""Build and load the C++ kernels of body_ops.cpp, gemm.cpp, attention.cpp and cross_entropy.cpp (torch's JIT extension loader, cached per machine).

The library is compiled for the CPU's vector capability as torch reports it (AVX-512, AVX2, or
ATen's portable default) and the capability is part of its name, so nodes of different CPUs that
share an extensions folder each get their own build. The first use on a machine compiles it
(about a minute on two cores, announced first); later runs load the cached library in well under a
second. torch's loader holds a lock during the build, so the ranks of a node build it once.

`load_body_ops()` returns the op namespace (torch.ops.zhiling_cpu) or None when the library cannot
be built here (no C++ compiler, an unsupported platform); `unavailable_reason()` then says why.
Set ZHILING_CPU_OPS=0 to never build or use it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.cpp_extension import get_default_build_root, load

SOURCES = [Path(__file__).with_name(name) for name in ("body_ops.cpp", "gemm.cpp", "attention.cpp", "cross_entropy.cpp")]
LIBRARY = "zhiling_cpu"
DISABLE_ENV = "ZHILING_CPU_OPS"
# Compiler flags per torch CPU capability: those torch builds its own kernels of that level with.
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
COMMON_FLAGS = ["-O3", "-ffp-contract=off"]

_state: dict = {}


def capability() -> str:
    """torch's CPU vector capability ("AVX512", "AVX2", "DEFAULT", ...), as used for the build."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "DEFAULT"


def extensions_root() -> Path:
    """Where torch's JIT loader keeps built extensions (its own rule: TORCH_EXTENSIONS_DIR, else a
    per-Python, per-accelerator folder under the user cache)."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def build_flags(level: str) -> list[str]:
    if level not in CAPABILITY_FLAGS:
        return list(COMMON_FLAGS)
    return COMMON_FLAGS + CAPABILITY_FLAGS[level] + [f"-DCPU_CAPABILITY={level}", f"-DCPU_CAPABILITY_{level}"]


def build_failure_summary(text: str) -> str:
    """The line of a failed build that says why: the compiler's first `error:` line when there is
    one (torch's message starts with the whole compiler command, which hides it), else the first line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()] or ["unknown error"]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines)[0][:400]


def library_name(level: str) -> str:
    return f"zhiling_cpu_body_ops_{level.lower()}"


def is_built(root: Path, level: Optional[str] = None) -> bool:
    name = library_name(level or capability())
    return (Path(root) / name / f"{name}.so").is_file()


def load_body_ops(say: Optional[Callable[[str], None]] = None):
    """The ops (torch.ops.zhiling_cpu), building them first if needed; None when they cannot be."""
    if "ops" in _state:
        return _state["ops"]
    if os.environ.get(DISABLE_ENV, "1").strip() == "0":
        _state.update(ops=None, reason=f"{DISABLE_ENV}=0")
        return None
    level = capability()
    if say is not None and not is_built(extensions_root(), level):
        say(f"building the fused CPU layer kernels (first run only, under a minute; cached in "
            f"{extensions_root() / library_name(level)})")
    try:
        load(library_name(level), sources=[str(path) for path in SOURCES], extra_cflags=build_flags(level),
             is_python_module=False, verbose=False)
    except (OSError, RuntimeError, ImportError) as e:  # no compiler, failed build, unloadable library
        _state.update(ops=None, reason=f"the C++ build failed: {build_failure_summary(str(e) or type(e).__name__)}")
        return None
    _state.update(ops=getattr(torch.ops, LIBRARY), reason=None)
    return _state["ops"]


def loaded_body_ops():
    """The ops if load_body_ops() already loaded them in this process, else None (never builds)."""
    return _state.get("ops")


def unavailable_reason() -> Optional[str]:
    """Why load_body_ops() returned None (None if it was not called or succeeded)."""
    return _state.get("reason")
