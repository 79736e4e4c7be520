"""Choice between the exact torch implementation and the Triton one.

"auto" picks Triton for CUDA tensors when Triton imports, the torch path otherwise. Triton on CPU
only works through its interpreter, which must be enabled (TRITON_INTERPRET=1) before Triton is
first imported; it is meant for tests at small shapes, so "auto" never picks it.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from engine.kernels.errors import KernelArgumentError

BACKENDS = ("auto", "torch", "triton")


def triton_unavailable_reason(device: torch.device) -> str:
    """Why the Triton backend cannot run on `device`, or "" when it can."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if device.type == "cuda":
        return ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ""
    return f"tensors are on {device.type}; Triton needs CUDA, or TRITON_INTERPRET=1 set before import"


def resolve_backend(requested: str, device: torch.device) -> str:
    """Map backend="auto"|"torch"|"triton" to the implementation that will run."""
    if requested not in BACKENDS:
        raise KernelArgumentError(f"backend={requested!r}: expected one of {BACKENDS}")
    if requested == "torch":
        return "torch"
    reason = triton_unavailable_reason(device)
    if requested == "triton":
        if reason:
            raise KernelArgumentError(f"backend='triton' cannot run: {reason}")
        return "triton"
    return "triton" if device.type == "cuda" and not reason else "torch"
