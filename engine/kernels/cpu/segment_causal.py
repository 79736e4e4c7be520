"""Causal attention within each sample of a padding-free row, all samples in one fused CPU call.

The samples of a micro-batch lie end to end; `cu_seqlens` (int64, [samples + 1]) marks where each
starts in the flattened tokens. torch's CPU flash attention, run once per sample, computes the whole
[n, n] square of every sample up to 512 tokens and allocates per call; attention.cpp computes each
block of 64 queries against the keys up to its last query only, with every product one BLAS call,
and keeps the probabilities for the backward while they are small (MAX_KEPT_PROBS_BYTES).
The output is written straight into the [tokens, heads, dim] layout the attention's output
projection reads, so the per-sample split, the concatenation and the final transpose copy go too.

q, k and v come as Hugging Face attention builds them ([batch, heads, length, dim] views of the
projection outputs); grouped-query attention (fewer key/value heads) is supported. float32, CPU,
no dropout.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

MAX_KEPT_PROBS_BYTES = 64 * 2**20
"""The forward keeps the attention probabilities for the backward (saving the recomputation of the
scores, about a fifth of the backward's products) when they take at most this much per call: about
n^2 / 2 floats per sample and head, about 4.4 MiB for a 2,000-token row of ~170-token samples and 4
heads; long samples (one of 4,096 tokens with 32 heads: 1 GiB) recompute them instead."""


def supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Inputs the kernel takes: float32 CPU [batch, heads, length, dim] q and [batch, kv_heads, length,
    dim] k and v (heads a multiple of kv_heads), no dropout."""
    if query.dim() != 4 or key.dim() != 4 or key.shape != value.shape or dropout:
        return False
    batch, heads, length, dim = query.shape
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (query, key, value))
            and (key.shape[0], key.shape[2], key.shape[3]) == (batch, length, dim)
            and key.shape[1] > 0 and heads % key.shape[1] == 0 and query.numel() > 0)


def tokens_major(x: torch.Tensor) -> torch.Tensor:
    """[batch, heads, length, dim] -> [heads, batch * length, dim]: a view for HF's layout (a
    transpose of [batch, length, heads, dim]), a copy otherwise; dim contiguous either way."""
    flat = x.permute(1, 0, 2, 3).reshape(x.shape[1], x.shape[0] * x.shape[2], x.shape[3])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


class SegmentCausalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, scale, ops, max_kept_probs_bytes):
        out, lse, probs = ops.segment_causal_forward(q, k, v, cu_seqlens, scale, max_kept_probs_bytes)
        ctx.save_for_backward(q, k, v, out, lse, probs, cu_seqlens)
        ctx.scale, ctx.ops = scale, ops
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, probs, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = ctx.ops.segment_causal_backward(grad_out.contiguous(), q, k, v, out, lse, probs, cu_seqlens,
                                                     ctx.scale)
        return dq.transpose(0, 1), dk.transpose(0, 1), dv.transpose(0, 1), None, None, None, None


def segment_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                   scale: Optional[float], ops, max_kept_probs_bytes: int = MAX_KEPT_PROBS_BYTES) -> torch.Tensor:
    """Causal attention within each sample (see `supported`): [batch, length, heads, dim], where
    cu_seqlens cuts the batch's batch * length tokens into samples."""
    batch, heads, length, dim = query.shape
    scale = dim ** -0.5 if scale is None else float(scale)
    out = SegmentCausalFunction.apply(tokens_major(query), tokens_major(key), tokens_major(value),
                                      cu_seqlens, scale, ops, max_kept_probs_bytes)
    return out.view(batch, length, heads, dim)


def reference_segment_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             cu_seqlens: torch.Tensor, scale: Optional[float],
                             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The same with one SDPA per sample in `dtype`: float64 is the tests' reference, float32 what
    the model computed without the kernel."""
    batch, heads, length, dim = query.shape
    q, k, v = (tokens_major(t).to(dtype) for t in (query, key, value))
    groups = heads // key.shape[1]
    k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
    bounds = cu_seqlens.tolist()
    pieces = [F.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b], is_causal=True, scale=scale)
              for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat(pieces, dim=1).transpose(0, 1).reshape(batch, length, heads, dim)
