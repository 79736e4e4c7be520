"""Rotary position embedding, x * cos + rotate_half(x) * sin, as one fused CPU kernel each way.

q and k arrive as Hugging Face attention builds them: [batch, heads, length, head_dim] views of the
projection output [batch, length, heads, head_dim], which is the layout the kernel reads, so no copy
is made; the result is returned in the same view layout eager torch would give. rotate_half(x) is
cat(-x[..., D/2:], x[..., :D/2]). The map is linear in x, so backward applies its transpose to the
gradient (dx1 = g1*c1 + g2*s2, dx2 = g2*c2 - g1*s1); cos and sin take no gradient (they come from
position ids). The eager version runs five passes (two multiplies, a negation, a concatenation, an
add) per tensor forward and as many backward.
"""

from __future__ import annotations

import torch


def supported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> bool:
    """Inputs the kernel takes: float32 CPU q and k [B, heads, L, D] (unsqueeze_dim 1) or
    [B, L, heads, D] (unsqueeze_dim 2; q and k may differ in heads), D even, cos and sin
    [B or 1, L, D] without gradient."""
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    length_dim = 3 - unsqueeze_dim
    batch, length, dim = q.shape[0], q.shape[length_dim], q.shape[-1]
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k, cos, sin))
            and (k.shape[0], k.shape[length_dim], k.shape[-1]) == (batch, length, dim) and dim % 2 == 0
            and cos.shape[0] in (1, batch) and tuple(cos.shape[1:]) == (length, dim)
            and not cos.requires_grad and not sin.requires_grad and q.numel() > 0 and k.numel() > 0)


class FusedRopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, heads_dim, ops):
        # heads_dim: where heads sit in x (1: [B, H, L, D]; 2: [B, L, H, D]); the kernel reads [B, L, H, D].
        blhd = x.transpose(1, 2) if heads_dim == 1 else x
        out = ops.rope_apply(blhd.contiguous(), cos, sin, False)
        ctx.save_for_backward(cos, sin)
        ctx.heads_dim, ctx.ops = heads_dim, ops
        return out.transpose(1, 2) if heads_dim == 1 else out

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        blhd = grad_out.transpose(1, 2) if ctx.heads_dim == 1 else grad_out
        grad = ctx.ops.rope_apply(blhd.contiguous(), cos, sin, True)
        return (grad.transpose(1, 2) if ctx.heads_dim == 1 else grad), None, None, None, None


def fused_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ops,
               unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated, the Hugging Face apply_rotary_pos_emb contract (see `supported`)."""
    heads_dim = unsqueeze_dim
    batch, length = q.shape[0], q.shape[3 - heads_dim]
    cos = cos.expand(batch, length, cos.shape[-1]).contiguous()
    sin = sin.expand(batch, length, sin.shape[-1]).contiguous()
    return (FusedRopeFunction.apply(q, cos, sin, heads_dim, ops),
            FusedRopeFunction.apply(k, cos, sin, heads_dim, ops))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    """The Hugging Face apply_rotary_pos_emb formula (float64 for the tests' reference)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
