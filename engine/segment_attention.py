"""Attention within each sample of a row, found from the position ids: no [L, L] mask, no padding.

A padding-free micro-batch (data.padding_free, the default) lays its samples end to end in one row,
position ids restarting at 0 with every sample, and passes no attention mask. The attention then has
to keep the samples apart by itself:

  * sdpa: the model's attention function becomes `sdpa_segments` (registered with transformers'
    AttentionInterface, so HF builds no mask for it): one causal SDPA per sample, each quadratic in
    its own length only (a packed row of 4 samples does ~1/4 of the work of the row-sized masked
    kernel, and an unpacked micro-batch computes no padding at all);
  * flash_attention_2: HF's own varlen path from the position ids (one row per micro-batch);
  * flex_attention: HF builds a block-sparse document mask from the position ids.
eager adds a dense mask to the scores and cannot run padding-free (a config error names the key).

Outside training-shaped calls (a query shorter than the keys: decoding with a KV cache; no position
ids) `sdpa_segments` is plain causal SDPA, so generation from the trained model is unchanged.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from engine.kernels.cpu import segment_causal
from engine.kernels.cpu.extension import loaded_body_ops

SEGMENTS = "sdpa_segments"
"""The attention implementation key a padding-free sdpa model runs under."""

FUSED_CPU_KERNEL = "fused_segment_attention"
"""Attribute the fused layers set on a model's attention modules: their float32 CPU calls then run
all samples through one fused kernel (engine/kernels/cpu/segment_causal.py) instead of one SDPA
each."""


def segment_bounds(position_ids: torch.Tensor, length: int) -> list[list[int]]:
    """Per row, the start of every sample (where position_ids is 0) and the row's end."""
    bounds = []
    for row in position_ids:
        starts = torch.nonzero(row[:length] == 0).flatten().tolist()
        bounds.append(([0] if not starts or starts[0] != 0 else []) + starts + [length])
    return bounds


def varlen_kernel():
    """torch's flash varlen attention (one kernel over all samples, from cumulative lengths), or None
    where this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def flat_cuts(position_ids: torch.Tensor, batch: int, length: int) -> list[int]:
    """Where each sample starts in the batch's rows laid end to end, then their end (cu_seqlens)."""
    cuts = [b * length + c for b, bounds in enumerate(segment_bounds(position_ids, length)) for c in bounds[:-1]]
    cuts.append(batch * length)
    return cuts


def _varlen_attention(query, key, value, position_ids, scaling, kernel) -> torch.Tensor:
    """All samples of all rows in one flash varlen call: [batch, length, heads, dim]."""
    batch, heads, length, dim = query.shape
    cuts = flat_cuts(position_ids, batch, length)
    cu = torch.tensor(cuts, dtype=torch.int32, device=query.device)
    longest = int(max(e - s for s, e in zip(cuts[:-1], cuts[1:])))
    params = inspect.signature(kernel).parameters  # torch 2.9-2.11 take is_causal, later ones window_size
    options = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if key.shape[1] != heads:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            key, value = (t.repeat_interleave(heads // key.shape[1], dim=1) for t in (key, value))
    flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value)]
    out = kernel(*flat, cu, cu, longest, longest, scale=scaling, **options)
    return out.view(batch, length, heads, dim)


def segment_causal_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, position_ids: Optional[torch.Tensor] = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention within each sample of a packed row, in the HF attention-function signature.

    query [batch, heads, length, dim], key/value [batch, kv_heads, length, dim]; returns [batch,
    length, heads, dim]. A sample starts where position_ids is 0; each runs its own causal SDPA, so
    memory is quadratic in the longest sample, not the row, and no token sees another sample. On CUDA
    in half precision all samples go through one flash varlen kernel call instead of a loop, and so
    they do in float32 on CPU through the fused kernel when the fused layers marked the module.
    """
    if position_ids is None:
        raise ValueError("segment_causal_attention needs position_ids (they mark where each sample starts)")
    kernel = varlen_kernel() if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) else None
    if kernel is not None and not (dropout and module.training):
        return _varlen_attention(query, key, value, position_ids, scaling, kernel), None
    ops = loaded_body_ops() if getattr(module, FUSED_CPU_KERNEL, False) else None
    if ops is not None and segment_causal.supported(query, key, value, dropout if module.training else 0.0):
        batch, length = query.shape[0], query.shape[2]
        cu = torch.tensor(flat_cuts(position_ids, batch, length), dtype=torch.int64)
        return segment_causal.segment_causal(query, key, value, cu, scaling, ops), None
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    p = dropout if module.training else 0.0
    length = query.shape[2]
    # split, not slicing: the backward of a split is one cat, that of each slice a zero-filled copy
    rows = []
    for b, bounds in enumerate(segment_bounds(position_ids, length)):
        sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        q, k, v = ((t if t.shape[0] == 1 else t.narrow(0, b, 1)).split(sizes, dim=2) for t in (query, key, value))
        pieces = [F.scaled_dot_product_attention(qs, ks, vs, dropout_p=p, is_causal=True, scale=scaling)
                  for qs, ks, vs in zip(q, k, v)]
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def sdpa_segments(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                  position_ids: Optional[torch.Tensor] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The `sdpa_segments` implementation: per-sample causal attention for training-shaped calls,
    plain SDPA otherwise (see the module docstring)."""
    if attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2]:
        return segment_causal_attention(module, query, key, value, None, dropout, scaling, position_ids)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    causal = attention_mask is None and query.shape[2] == key.shape[2] and query.shape[2] > 1
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                         dropout_p=dropout if module.training else 0.0, is_causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `sdpa_segments` a known attention implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(SEGMENTS, sdpa_segments)


def use_segment_attention(model: torch.nn.Module) -> str:
    """Switch a padding-free model to attention within samples; returns the implementation it runs
    (sdpa -> sdpa_segments; flash_attention_2 and flex_attention already keep samples apart from the
    position ids). Applies to the model's config and every sub-config (multimodal wrappers)."""
    config = model.config
    current = config.get_text_config()._attn_implementation
    if current != "sdpa":
        return current
    register()
    for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
        cfg._attn_implementation = SEGMENTS
    return SEGMENTS
