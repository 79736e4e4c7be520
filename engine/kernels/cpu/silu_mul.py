"""The SwiGLU gate silu(a) * b (a = gate projection, b = up projection) as one fused CPU kernel
each way.

Forward keeps a and b (as autograd does for the eager expression) and writes only the product;
backward writes da = g * b * s * (1 + a * (1 - s)) and db = g * a * s, s = sigmoid(a), in one pass.
The eager expression runs two passes forward and three in backward, each over [tokens,
intermediate] tensors, the largest activations of the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Inputs the kernel takes: float32 CPU tensors of one shape."""
    return (a.device.type == "cpu" and b.device.type == "cpu" and a.dtype == torch.float32
            and b.dtype == torch.float32 and a.shape == b.shape and a.numel() > 0)


class FusedSiluMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, ops):
        a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        ctx.ops = ops
        return ops.silu_mul_forward(a, b)

    @staticmethod
    def backward(ctx, grad_y):
        a, b = ctx.saved_tensors
        grad_a, grad_b = ctx.ops.silu_mul_backward(grad_y.contiguous(), a, b)
        return grad_a, grad_b, None


def fused_silu_mul(a: torch.Tensor, b: torch.Tensor, ops) -> torch.Tensor:
    """silu(a) * b (float32 CPU, see `supported`) through the kernel `ops`."""
    return FusedSiluMulFunction.apply(a, b, ops)


def reference_silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b
