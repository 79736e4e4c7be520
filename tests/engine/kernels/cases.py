"""Shared inputs and error measure for the fused cross-entropy tests (torch and interpreted Triton).

Relative error of a against the float64 reference b is ||a - b||_2 / max(||b||_2, 1e-30), over the
flattened tensor (a scalar loss included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from data_pipeline.schedule.labels import IGNORE_INDEX
from engine.kernels import masked_linear_cross_entropy, reference_masked_linear_cross_entropy

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
# Any grad_output must scale the gradients: 1.0 would hide a missing multiplication.
GRAD_SCALE = 0.37


@dataclass(frozen=True)
class Case:
    """One input configuration; `masked` is the fraction of rows labelled ignore_index."""

    dtype: str
    rows: int
    vocab: int
    masked: float
    bias: bool
    max_logit: Optional[float] = None
    hidden_size: int = 24
    chunk_size: Optional[int] = None
    seed: int = 0
    strategy: str = "row_chunks"

    @property
    def name(self) -> str:
        return "-".join(f"{k}={v}" for k, v in asdict(self).items())


@dataclass
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    labels: torch.Tensor


def make_inputs(case: Case) -> Inputs:
    """Random inputs; with max_logit the hidden states are scaled so the largest |logit| equals it."""
    generator = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    hidden = torch.randn(case.rows, case.hidden_size, generator=generator)
    weight = torch.randn(case.vocab, case.hidden_size, generator=generator) / case.hidden_size**0.5
    if case.max_logit is not None:
        hidden *= case.max_logit / (hidden @ weight.T).abs().max()
    bias = torch.randn(case.vocab, generator=generator) if case.bias else None
    labels = torch.randint(0, case.vocab, (case.rows,), generator=generator)
    n_masked = round(case.masked * case.rows)
    labels[torch.randperm(case.rows, generator=generator)[:n_masked]] = IGNORE_INDEX
    return Inputs(
        hidden=hidden.to(dtype).requires_grad_(True),
        weight=weight.to(dtype).requires_grad_(True),
        bias=None if bias is None else bias.to(dtype).requires_grad_(True),
        labels=labels,
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    difference = (actual.detach().double() - expected.double()).norm()
    return (difference / expected.double().norm().clamp_min(1e-30)).item()


def measure_case(case: Case, backend: str) -> dict:
    """Run the kernel and the reference; relative errors per output, plus exact facts checked as-is."""
    inputs = make_inputs(case)
    loss_sum, n_target = masked_linear_cross_entropy(
        inputs.hidden, inputs.weight, inputs.labels, IGNORE_INDEX, inputs.bias, case.chunk_size, backend, case.strategy
    )
    (loss_sum * GRAD_SCALE).backward()
    expected = reference_masked_linear_cross_entropy(
        inputs.hidden, inputs.weight, inputs.labels, IGNORE_INDEX, inputs.bias, GRAD_SCALE
    )
    grads = [inputs.hidden.grad, inputs.weight.grad] + ([inputs.bias.grad] if case.bias else [])
    errors = {
        "loss": relative_error(loss_sum, expected.loss_sum),
        "grad_hidden": relative_error(inputs.hidden.grad, expected.grad_hidden),
        "grad_weight": relative_error(inputs.weight.grad, expected.grad_weight),
    }
    if case.bias:
        errors["grad_bias"] = relative_error(inputs.bias.grad, expected.grad_bias)
    return {
        "errors": errors,
        "loss": loss_sum.item(),
        "n_target": int(n_target),
        "expected_n_target": int(expected.n_target_tokens),
        "loss_dtype": str(loss_sum.dtype),
        "grads_all_zero": all(bool((grad == 0).all()) for grad in grads),
        "grads_finite": all(bool(grad.isfinite().all()) for grad in grads),
        "grad_dtypes_match": all(grad.dtype == getattr(torch, case.dtype) for grad in grads),
    }
