"""Fused RMSNorm (engine/kernels/cpu/rms_norm.py) against the float64 reference: forward, dx and
dw over a grid of shapes (vector tails included), the eager float32 formula's error as the bound."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.cpu.rms_norm import fused_rms_norm, reference_rms_norm, supported


def _case(rows, hidden, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g) * scale
    w = torch.randn(hidden, generator=g)
    grad = torch.randn(rows, hidden, generator=g)
    return x, w, grad


def _grads(fn, x, w, grad):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w)
    y.backward(grad)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("rows,hidden", [(1, 8), (7, 64), (33, 100), (300, 256), (5, 4096), (64, 3)])
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_matches_float64_reference(ops, rows, hidden, scale):
    x, w, grad = _case(rows, hidden, scale=scale)
    want = _grads(lambda a, b: reference_rms_norm(a, b, 1e-6), x.double(), w.double(), grad.double())
    got = _grads(lambda a, b: fused_rms_norm(a, b, 1e-6, ops), x, w, grad)
    eager = _grads(lambda a, b: reference_rms_norm(a, b, 1e-6), x, w, grad)
    for name, g, e, r in zip(("y", "dx", "dw"), got, eager, want):
        scale_of = r.abs().max().item()
        err, eager_err = (g.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
        # within a few float32 ulps of the exact value, and no worse than eager float32 by much
        assert err <= max(4 * eager_err, 1e-6 * scale_of), (name, err, eager_err)
        assert g.dtype == torch.float32 and g.shape == r.shape


def test_batched_and_noncontiguous_input(ops):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 40, 16, generator=g)
    x = base.transpose(1, 2)  # [3, 16, 40], not contiguous
    w = torch.randn(40, generator=g)
    torch.testing.assert_close(fused_rms_norm(x, w, 1e-5, ops), reference_rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-6)


def test_eps_is_used(ops):
    x, w, _ = _case(4, 32, scale=1e-4)
    a, b = fused_rms_norm(x, w, 1e-6, ops), fused_rms_norm(x, w, 1e-2, ops)
    assert (a - b).abs().max() > 1e-2  # a wrong or ignored eps fails here
    torch.testing.assert_close(b, reference_rms_norm(x, w, 1e-2))


def test_two_threads_agree_with_one(ops):
    x, w, grad = _case(301, 96, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(lambda a, b: fused_rms_norm(a, b, 1e-6, ops), x, w, grad)
        torch.set_num_threads(2)
        two = _grads(lambda a, b: fused_rms_norm(a, b, 1e-6, ops), x, w, grad)
        again = _grads(lambda a, b: fused_rms_norm(a, b, 1e-6, ops), x, w, grad)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, two, again):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(b, c)  # deterministic for a thread count


def test_supported_inputs():
    w = torch.ones(8)
    assert supported(torch.ones(2, 8), w)
    assert not supported(torch.ones(2, 8, dtype=torch.bfloat16), w)
    assert not supported(torch.ones(2, 8), torch.ones(8, dtype=torch.float64))
    assert not supported(torch.ones(2, 7), w)
    assert not supported(torch.ones(0, 8), w)
