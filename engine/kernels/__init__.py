"""Fused masked linear cross-entropy (torch and Triton) and its float64 reference."""

from engine.kernels.contract import KernelArgumentError
from engine.kernels.masked_linear_ce import masked_linear_cross_entropy, masked_linear_cross_entropy_by_group
from engine.kernels.reference import reference_masked_linear_cross_entropy

__all__ = [
    "KernelArgumentError",
    "masked_linear_cross_entropy",
    "masked_linear_cross_entropy_by_group",
    "reference_masked_linear_cross_entropy",
]
