"""Fused rotary embedding (engine/kernels/cpu/rope.py) against the float64 Hugging Face formula:
both layouts, grouped-query k, a broadcast batch of cos/sin, gradients of q and k; the output keeps
eager torch's memory layout."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.cpu.rope import fused_rope, reference_rope, supported


def _tables(batch, length, dim, g):
    positions = torch.randint(0, 500, (batch, length), generator=g).double()
    freqs = positions[..., None] / (10000 ** (torch.arange(0, dim, 2).double() / dim))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _projection_view(batch, length, heads, dim, g):
    """q as HF attention makes it: a [B, H, L, D] transpose of the projection's [B, L, H, D]."""
    return torch.randn(batch, length, heads, dim, generator=g).transpose(1, 2)


def _run(fn, q, k, cos, sin, gq, gk, unsqueeze_dim):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qo, ko = fn(q, k, cos, sin, unsqueeze_dim)
    (qo * gq).sum().add((ko * gk).sum()).backward()
    return qo, ko, q.grad, k.grad


@pytest.mark.parametrize("batch,length,heads,kv_heads,dim,cos_batch", [
    (1, 1, 1, 1, 2, 1), (2, 13, 4, 2, 64, 2), (1, 50, 3, 3, 40, 1), (3, 7, 8, 1, 128, 1), (2, 9, 2, 2, 18, 2),
])
def test_matches_float64_reference(ops, batch, length, heads, kv_heads, dim, cos_batch):
    g = torch.Generator().manual_seed(0)
    q, k = _projection_view(batch, length, heads, dim, g), _projection_view(batch, length, kv_heads, dim, g)
    cos, sin = _tables(cos_batch, length, dim, g)
    gq, gk = torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g)
    want = _run(reference_rope, q.double(), k.double(), cos, sin, gq.double(), gk.double(), 1)
    got = _run(lambda *a: fused_rope(*a[:4], ops, a[4]), q, k, cos.float(), sin.float(), gq, gk, 1)
    eager = _run(reference_rope, q, k, cos.float(), sin.float(), gq, gk, 1)
    for name, g_, e, r in zip(("q", "k", "dq", "dk"), got, eager, want):
        err, eager_err = (g_.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
        assert err <= max(2 * eager_err, 1e-6 * r.abs().max().item()), (name, err, eager_err)
        assert g_.shape == r.shape, name
        # the same memory layout as eager (strides of size-1 dimensions carry no meaning)
        assert [st for st, n in zip(g_.stride(), g_.shape) if n > 1] == [st for st, n in zip(e.stride(), e.shape) if n > 1]


def test_heads_last_layout(ops):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 11, 4, 16, generator=g), torch.randn(2, 11, 2, 16, generator=g)
    cos, sin = (t.float() for t in _tables(2, 11, 16, g))
    for got, want in zip(fused_rope(q, k, cos, sin, ops, unsqueeze_dim=2), reference_rope(q, k, cos, sin, 2)):
        torch.testing.assert_close(got, want)


def test_rotation_is_not_identity(ops):
    """A kernel that skipped the rotate_half term would still pass at position 0; not here."""
    g = torch.Generator().manual_seed(2)
    q = _projection_view(1, 5, 2, 8, g)
    cos, sin = (t.float() for t in _tables(1, 5, 8, g))
    qo, _ = fused_rope(q, q, cos, sin, ops)
    assert (qo - q * cos.unsqueeze(1)).abs().max() > 1e-2


def test_supported_inputs():
    q, cos = torch.ones(1, 2, 3, 4), torch.ones(1, 3, 4)
    assert supported(q, q, cos, cos, 1)
    assert not supported(q, q, cos, cos, 0)
    assert not supported(torch.ones(1, 2, 3, 5), torch.ones(1, 2, 3, 5), torch.ones(1, 3, 5), torch.ones(1, 3, 5), 1)
    assert not supported(q, q, torch.ones(1, 4, 4), torch.ones(1, 4, 4), 1)  # length differs
    assert not supported(q, q, cos.requires_grad_(), cos, 1)
