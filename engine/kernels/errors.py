"""The error raised for bad arguments to the fused cross-entropy kernels."""

from __future__ import annotations


class KernelArgumentError(ValueError):
    """An argument of masked_linear_cross_entropy is invalid; the message names the argument."""
