"""float32 products on CPU through oneDNN (gemm.cpp): the projections of the model body and the
logits and dW products of the fused loss.

`gemm_into(out, a, b, beta, varying)` is out := beta * out + a @ b; `varying` names the dimension
that changes with every micro-batch (ROWS, COLUMNS or INNER), which the kernel cuts into blocks so
that oneDNN builds a few primitives per run, not one per micro-batch. `fused_linear(x, weight)` is
F.linear whose forward and both backward products run through it (the token dimension
is the rows of x W^T and of dY W, the inner dimension of dY^T X). Exact float32: only the order of
the additions differs from the default BLAS.
"""

from __future__ import annotations

import functools
import platform
from typing import Optional

import torch
import torch.nn.functional as F

ROWS, COLUMNS, INNER = 0, 1, 2
MIN_ROWS = 64
"""Fewer token rows than this (decoding, tiny batches) stay with F.linear."""


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """Why gemm.cpp cannot run here, or None. On x86, torch's oneDNN matmul entry point serves
    float32 only on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT and raises elsewhere; there,
    and in builds without oneDNN, the products stay with the default BLAS."""
    if not torch.backends.mkldnn.is_available():
        return "this torch is built without oneDNN"
    if platform.machine().lower() in ("aarch64", "arm64"):
        return None
    device_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if device_check is None:
        return "this torch cannot tell whether its oneDNN matmul serves float32 on this CPU"
    if not device_check():
        return (f"this CPU lacks AVX-512 BW/VL/DQ and AVX-NE-CONVERT (capability "
                f"{torch.backends.cpu.get_cpu_capability()}), which torch's oneDNN matmul asks for")
    return None


def available() -> bool:
    """Whether gemm.cpp's products can run here (see `unavailable_reason`)."""
    return unavailable_reason() is None


def _cpu_float32(*tensors) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)


def supported(x: torch.Tensor, weight: torch.Tensor, bias=None) -> bool:
    """Inputs fused_linear takes: float32 CPU activations of at least MIN_ROWS rows, weight, bias."""
    return (_cpu_float32(x, weight, bias) and x.dim() >= 2 and x.shape[-1] == weight.shape[1]
            and x.numel() // max(1, x.shape[-1]) >= MIN_ROWS)


def gemm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, varying: int, ops) -> torch.Tensor:
    """out := beta * out + a @ b (float32 CPU matrices of any strides); returns out."""
    ops.gemm_(out, a, b, float(beta), int(varying))
    return out


class FusedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, ops):
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.ops, ctx.input_shape, ctx.has_bias = ops, x.shape, bias is not None
        out = gemm_into(rows.new_empty(rows.shape[0], weight.shape[0]), rows, weight.t(), 0.0, ROWS, ops)
        if bias is not None:
            out.add_(bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        rows, weight = ctx.saved_tensors
        grad_rows = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = gemm_into(rows.new_empty(rows.shape), grad_rows, weight, 0.0, ROWS, ctx.ops)
            grad_x = grad_x.view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_w = gemm_into(weight.new_empty(weight.shape), grad_rows.t(), rows, 0.0, INNER, ctx.ops)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_rows.sum(dim=0)
        return grad_x, grad_w, grad_b, None


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias, ops) -> torch.Tensor:
    """x @ weight^T + bias (see `supported`) with all three products through gemm.cpp."""
    return FusedLinearFunction.apply(x, weight, bias, ops)


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    return F.linear(x, weight, bias)
