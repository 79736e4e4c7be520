"""The contract shared by the fused cross-entropy kernels: their argument error, argument checks
and kept-row selection, the backend choice (exact torch or Triton), and the types the two chunking
algorithms (masked_linear_ce.py: row chunks; vocab_blocked_ce.py: vocabulary blocks) return.

Each check raises KernelArgumentError naming the argument, since a wrong shape here would
otherwise surface as an opaque matmul error deep inside a chunk loop.

Backend: "auto" picks Triton for CUDA tensors when Triton imports, the torch path otherwise.
Triton on CPU only works through its interpreter, which must be enabled (TRITON_INTERPRET=1)
before Triton is first imported; it is meant for tests at small shapes, so "auto" never picks it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import torch

from engine.kernels.mixed_precision_matmul import SUPPORTED_DTYPES


class KernelArgumentError(ValueError):
    """An argument of masked_linear_cross_entropy is invalid; the message names the argument."""


@dataclass
class NeededGrads:
    """Which inputs want a gradient."""

    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


@dataclass
class ChunkedResult:
    """Per kept row loss and the unscaled gradients of their sum in the inputs' dtypes (None when
    not needed)."""

    row_losses: torch.Tensor
    grad_hidden: Optional[torch.Tensor]
    grad_weight: Optional[torch.Tensor]
    grad_bias: Optional[torch.Tensor]


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


def check_arguments(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor],
    chunk_size: Optional[int],
) -> None:
    """Shapes, dtypes and devices of the inputs; raise KernelArgumentError on the first mismatch."""
    if hidden.dim() != 2:
        raise KernelArgumentError(f"hidden: expected [N, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise KernelArgumentError(
            f"weight: expected [V, {hidden.shape[1]}] to match hidden [N, d], got {tuple(weight.shape)}"
        )
    if labels.shape != (hidden.shape[0],):
        raise KernelArgumentError(f"labels: expected shape ({hidden.shape[0]},), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise KernelArgumentError(f"labels: expected int32 or int64, got {labels.dtype}")
    if hidden.dtype not in SUPPORTED_DTYPES or weight.dtype != hidden.dtype:
        raise KernelArgumentError(
            f"hidden/weight dtypes {hidden.dtype}/{weight.dtype}: both must be one of {SUPPORTED_DTYPES}"
        )
    devices = {hidden.device, weight.device, labels.device}
    if bias is not None:
        if bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype:
            raise KernelArgumentError(
                f"bias: expected shape ({weight.shape[0]},) and dtype {hidden.dtype}, "
                f"got {tuple(bias.shape)} {bias.dtype}"
            )
        devices.add(bias.device)
    if len(devices) != 1:
        raise KernelArgumentError(f"hidden, weight, labels, bias: all on one device, got {devices}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise KernelArgumentError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")


def select_kept_rows(labels: torch.Tensor, ignore_index: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of rows with a target (label != ignore_index) and their int64 labels.

    One host sync (nonzero) is unavoidable: the number of kept rows sizes everything after it.
    """
    kept_rows = torch.nonzero(labels != ignore_index).squeeze(1)
    kept_labels = labels.index_select(0, kept_rows).to(torch.int64)
    low, high = _value_range(kept_labels)
    if low < 0 or high >= vocab_size:
        raise KernelArgumentError(
            f"labels: values must be ignore_index ({ignore_index}) or in [0, {vocab_size}), "
            f"found range [{low}, {high}]"
        )
    return kept_rows, kept_labels


def _value_range(values: torch.Tensor) -> tuple[int, int]:
    """(min, max) of an integer tensor in one host sync; (0, 0) when it is empty."""
    if values.numel() == 0:
        return 0, 0
    low, high = torch.stack([values.min(), values.max()]).tolist()
    return low, high


def kept_groups_of(groups: torch.Tensor, labels: torch.Tensor, kept_rows: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The int64 group ids of the kept rows, checked to lie in [0, num_groups).

    Rows without a target may carry any id (padding is often -1): they are dropped anyway.
    """
    if not isinstance(num_groups, int) or num_groups < 1:
        raise KernelArgumentError(f"num_groups: expected a positive int, got {num_groups!r}")
    if groups.shape != labels.shape or groups.device != labels.device:
        raise KernelArgumentError(
            f"groups: expected shape {tuple(labels.shape)} on {labels.device}, got {tuple(groups.shape)} on {groups.device}"
        )
    if groups.dtype not in (torch.int32, torch.int64):
        raise KernelArgumentError(f"groups: expected int32 or int64, got {groups.dtype}")
    kept_groups = groups.index_select(0, kept_rows).to(torch.int64)
    low, high = _value_range(kept_groups)
    if low < 0 or high >= num_groups:
        raise KernelArgumentError(
            f"groups: rows with a target must be in groups [0, {num_groups}), found range [{low}, {high}]"
        )
    return kept_groups
