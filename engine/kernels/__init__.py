"""Fused masked linear cross-entropy (torch and Triton) and its float64 reference."""

from engine.kernels.errors import KernelArgumentError
from engine.kernels.masked_linear_ce import masked_linear_cross_entropy
from engine.kernels.reference import reference_masked_linear_cross_entropy

__all__ = ["KernelArgumentError", "masked_linear_cross_entropy", "reference_masked_linear_cross_entropy"]
