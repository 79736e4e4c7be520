"""Float64 ground truth for the masked linear cross-entropy.

Deliberately naive: it materialises the full [N, V] logits and uses log_softmax, so it is easy to
trust and only fit for small shapes. Tests compare every backend against it; the benchmark uses
the same formula in the input dtype as the "naive" baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ReferenceResult:
    """Loss, target count and float64 gradients of the loss sum."""

    loss_sum: torch.Tensor
    n_target_tokens: torch.Tensor
    grad_hidden: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: Optional[torch.Tensor]


def reference_masked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    bias: Optional[torch.Tensor] = None,
    grad_scale: float = 1.0,
) -> ReferenceResult:
    """Sum of per-row CE over rows whose label != ignore_index, with gradients, in float64.

    Gradients are those of `grad_scale * loss_sum`, so callers can check that a backend scales its
    gradients by the incoming grad_output.
    """
    hidden64 = hidden.detach().to(torch.float64).requires_grad_(True)
    weight64 = weight.detach().to(torch.float64).requires_grad_(True)
    bias64 = None if bias is None else bias.detach().to(torch.float64).requires_grad_(True)
    logits = hidden64 @ weight64.T
    if bias64 is not None:
        logits = logits + bias64
    loss_sum = torch.nn.functional.cross_entropy(
        logits, labels.to(torch.long), ignore_index=ignore_index, reduction="sum"
    )
    (loss_sum * grad_scale).backward()
    return ReferenceResult(
        loss_sum=loss_sum.detach(),
        n_target_tokens=(labels != ignore_index).sum(),
        grad_hidden=hidden64.grad,
        grad_weight=weight64.grad,
        grad_bias=None if bias64 is None else bias64.grad,
    )
