"""Fused SwiGLU gate silu(a) * b (engine/kernels/cpu/silu_mul.py) against the float64 reference:
forward and both gradients, over sizes with vector tails and large-magnitude inputs."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.cpu.silu_mul import fused_silu_mul, reference_silu_mul, supported


def _grads(fn, a, b, grad):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    y = fn(a, b)
    y.backward(grad)
    return y.detach(), a.grad, b.grad


@pytest.mark.parametrize("shape", [(1,), (17,), (3, 688), (2, 5, 100), (40000,)])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_matches_float64_reference(ops, shape, scale):
    g = torch.Generator().manual_seed(0)
    a, b, grad = (torch.randn(*shape, generator=g) * s for s in (scale, 1.0, 1.0))
    want = _grads(reference_silu_mul, a.double(), b.double(), grad.double())
    got = _grads(lambda x, y: fused_silu_mul(x, y, ops), a, b, grad)
    eager = _grads(reference_silu_mul, a, b, grad)
    for name, g_, e, r in zip(("y", "da", "db"), got, eager, want):
        err, eager_err = (g_.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
        assert err <= max(4 * eager_err, 1e-6 * r.abs().max().item()), (name, err, eager_err)
        assert torch.isfinite(g_).all()


def test_extreme_gates_stay_finite(ops):
    a = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4] * 3)
    b = torch.ones_like(a)
    got = _grads(lambda x, y: fused_silu_mul(x, y, ops), a, b, torch.ones_like(a))
    want = _grads(reference_silu_mul, a.double(), b.double(), torch.ones_like(a).double())
    for g_, r in zip(got, want):
        assert torch.isfinite(g_).all()
        torch.testing.assert_close(g_.double(), r, rtol=1e-5, atol=1e-6)


def test_noncontiguous_inputs(ops):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(64, 33, generator=g).T, torch.randn(64, 33, generator=g).T
    torch.testing.assert_close(fused_silu_mul(a, b, ops), reference_silu_mul(a, b))


def test_supported_inputs():
    assert supported(torch.ones(3, 4), torch.ones(3, 4))
    assert not supported(torch.ones(3, 4), torch.ones(4))
    assert not supported(torch.ones(3, 4, dtype=torch.float16), torch.ones(3, 4, dtype=torch.float16))
