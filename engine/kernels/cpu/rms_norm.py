"""RMSNorm, y = w * (x * rsqrt(mean(x^2, last dim) + eps)), as one fused CPU kernel each way.

Forward keeps only the per-row rstd [rows] besides x; backward forms dx and dw in one pass over
the rows: with xh = x * rstd, dw = sum over rows of g * xh and dx = rstd * (g*w - xh * mean(g*w*xh)).
The eager Hugging Face module runs six elementwise passes forward and about ten in backward.
"""

from __future__ import annotations

import torch


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Inputs the kernel takes: float32 CPU tensors, weight of shape [x.shape[-1]]."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.dim() == 1 and x.dim() >= 1
            and x.shape[-1] == weight.shape[0] and x.numel() > 0)


class FusedRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, ops):
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        y, rstd = ops.rms_norm_forward(rows, weight.contiguous(), float(eps))
        ctx.save_for_backward(rows, weight, rstd)
        ctx.ops = ops
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        rows, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = ctx.ops.rms_norm_backward(grad_y.reshape(rows.shape).contiguous(), rows,
                                                        weight.contiguous(), rstd)
        return grad_x.view(grad_y.shape), grad_weight, None, None


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, ops) -> torch.Tensor:
    """RMSNorm of the last dimension of x (float32 CPU, see `supported`) through the kernel `ops`."""
    return FusedRMSNormFunction.apply(x, weight, eps, ops)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Hugging Face LlamaRMSNorm formula in the dtype of x (float64 for the tests' reference)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
