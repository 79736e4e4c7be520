"""Per-sample causal attention in one fused CPU call (engine/kernels/cpu/segment_causal.py) against
the float64 reference: output and the three gradients over sample lengths around the 64-query
block, grouped-query heads, head sizes with vector tails, several rows, large scores, both layouts,
both ways of running the products (the BLAS's sgemm and ATen's addmm) and both backwards (from the
kept probabilities and recomputing them)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.cpu.segment_causal import MAX_KEPT_PROBS_BYTES, reference_segment_causal, segment_causal, supported


@pytest.fixture(params=["blas", "aten"])
def products(request, ops):
    """Run the test with the products on the BLAS (where this torch exports one) and on ATen."""
    way = ops.segment_causal_use_aten_products(request.param == "aten")
    if way != request.param:
        ops.segment_causal_use_aten_products(False)
        pytest.skip(f"this torch exports no sgemm: the products always go through {way}")
    yield ops
    ops.segment_causal_use_aten_products(False)


@pytest.fixture(params=["kept", "recomputed"])
def probs_budget(request):
    """The backward from the forward's kept probabilities, or recomputing them (no budget)."""
    return MAX_KEPT_PROBS_BYTES if request.param == "kept" else 0


def _inputs(lengths_per_row, heads, kv_heads, dim, scale=1.0, hf_layout=True, seed=0):
    """q, k, v [batch, heads, length, dim] with every row the samples of `lengths_per_row`, and cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    batch, length = len(lengths_per_row), sum(lengths_per_row[0])
    assert all(sum(row) == length for row in lengths_per_row)
    if hf_layout:  # views of the projections' [batch, length, heads, dim], as HF builds them
        qkv = torch.randn(batch, length, heads + 2 * kv_heads, dim, generator=g) * scale
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    else:
        q = torch.randn(batch, heads, length, dim, generator=g) * scale
        k, v = (torch.randn(batch, kv_heads, length, dim, generator=g) * scale for _ in range(2))
    cuts = [0]
    for row in lengths_per_row:
        for n in row:
            cuts.append(cuts[-1] + n)
    return q, k, v, torch.tensor(cuts, dtype=torch.int64)


def _eager(q, k, v, cu, scale):
    """What the model computed before: one float32 SDPA per sample."""
    return reference_segment_causal(q, k, v, cu, scale, dtype=torch.float32)


def _run(fn, q, k, v, cu, scale, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, cu, scale)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


CASES = [
    ([[1]], 1, 1, 64),
    ([[5]], 2, 2, 64),
    ([[64]], 4, 4, 64),
    ([[65]], 4, 4, 64),
    ([[170, 60, 300]], 4, 4, 64),
    ([[1, 64, 65, 129]], 4, 2, 64),
    ([[512]], 2, 1, 64),
    ([[30, 97], [127]], 4, 2, 16),  # two rows, one of a single sample
    ([[7, 40, 3]], 3, 3, 20),  # head size with a vector tail
]


@pytest.mark.parametrize("lengths, heads, kv_heads, dim", CASES)
def test_matches_float64_reference(products, probs_budget, lengths, heads, kv_heads, dim):
    q, k, v, cu = _inputs(lengths, heads, kv_heads, dim)
    scale = dim ** -0.5
    grad = torch.randn(q.shape[0], q.shape[2], heads, dim, generator=torch.Generator().manual_seed(9))
    want = _run(reference_segment_causal, q.double(), k.double(), v.double(), cu, scale, grad.double())
    got = _run(lambda *a: segment_causal(*a, products, probs_budget), q, k, v, cu, scale, grad)
    eager = _run(_eager, q, k, v, cu, scale, grad)
    for name, g, e, r in zip(("out", "dq", "dk", "dv"), got, eager, want):
        assert g.shape == r.shape and g.dtype == torch.float32, name
        err, eager_err = (g.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
        assert err <= max(4 * eager_err, 1e-6 * r.abs().max().item()), (name, err, eager_err)


def test_large_scores_stay_finite_and_exact(products, probs_budget):
    """Scores in the hundreds: the running maximum keeps exp in range."""
    q, k, v, cu = _inputs([[90, 40]], 2, 2, 32, scale=6.0, seed=3)
    grad = torch.ones(1, 130, 2, 32)
    want = _run(reference_segment_causal, q.double(), k.double(), v.double(), cu, None, grad.double())
    got = _run(lambda *a: segment_causal(*a, products, probs_budget), q, k, v, cu, None, grad)
    for g, r in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=2e-4)


def test_contiguous_layout_gives_the_same_as_hf_views(ops):
    q, k, v, cu = _inputs([[33, 80]], 4, 2, 64, hf_layout=False, seed=5)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not views[0].is_contiguous()
    grad = torch.randn(1, 113, 4, 64, generator=torch.Generator().manual_seed(6))
    a = _run(lambda *x: segment_causal(*x, ops), q, k, v, cu, None, grad)
    b = _run(lambda *x: segment_causal(*x, ops), *views, cu, None, grad)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_no_token_sees_another_sample(ops):
    """Changing the second sample leaves the first sample's output and gradients untouched."""
    q, k, v, cu = _inputs([[50, 70]], 2, 2, 32, seed=7)
    grad = torch.zeros(1, 120, 2, 32)
    grad[:, :50] = 1.0
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 50:] += 3.0
    v2[:, :, 50:] -= 2.0
    a = _run(lambda *x: segment_causal(*x, ops), q, k, v, cu, None, grad)
    b = _run(lambda *x: segment_causal(*x, ops), q, k2, v2, cu, None, grad)
    assert torch.equal(a[0][:, :50], b[0][:, :50])
    for x, y in zip(a[1:], b[1:]):
        assert torch.equal(x[:, :, :50], y[:, :, :50])
        assert torch.count_nonzero(y[:, :, 50:]) == 0


def test_kept_probabilities_follow_the_budget(ops):
    """Kept exactly when they fit: 2 heads x (64*64 + 36*100) floats for one 100-token sample."""
    q, k, v, cu = _inputs([[100]], 2, 2, 16)
    need = 4 * 2 * (64 * 64 + 36 * 100)
    for budget, kept in ((need, need // 4), (need - 1, 0)):
        _, _, probs = ops.segment_causal_forward(*(t[0] for t in (q, k, v)), cu, 0.25, budget)
        assert probs.numel() == kept


def test_supported_inputs():
    q, k = torch.ones(1, 4, 8, 16), torch.ones(1, 2, 8, 16)
    assert supported(q, k, k, 0.0)
    assert not supported(q, k, k, 0.1)  # dropout
    assert not supported(q.double(), k.double(), k.double(), 0.0)
    assert not supported(q, torch.ones(1, 3, 8, 16), torch.ones(1, 3, 8, 16), 0.0)  # 4 heads, 3 kv heads
    assert not supported(q, torch.ones(1, 2, 9, 16), torch.ones(1, 2, 9, 16), 0.0)
    assert not supported(torch.ones(1, 4, 0, 16), torch.ones(1, 2, 0, 16), torch.ones(1, 2, 0, 16), 0.0)
