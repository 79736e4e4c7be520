"""gemm.cpp through engine/kernels/cpu/linear.py against float64 products: every blocking case of
the varying dimension (under a quantum, whole blocks, a quantised remainder, a BLAS tail), every
layout, accumulation, and the autograd Function with and without bias."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.cpu import linear
from engine.kernels.cpu.linear import COLUMNS, INNER, ROWS, gemm_into

# sizes of the varying dimension: tail only, one quantum, quantum + tail, a block, block + quantised
# remainder + tail, two blocks + tail
VARYING_SIZES = [37, 64, 100, 512, 700, 1100]


@pytest.fixture
def ops(ops):
    """The built ops, where torch's oneDNN matmul serves float32 on this CPU (else a skip that says why;
    test_unavailability_is_true checks that such a CPU really is refused)."""
    if not linear.available():
        pytest.skip(f"oneDNN float32 products unavailable: {linear.unavailable_reason()}")
    return ops


def test_unavailability_is_true():
    """available() says no exactly where torch's oneDNN matmul refuses float32: where it says no
    for the CPU, gemm_ raises; where it says yes, gemm_ multiplies."""
    from engine.kernels.cpu.extension import load_body_ops

    built = load_body_ops()
    if built is None or not torch.backends.mkldnn.is_available():
        pytest.skip("no built ops or no oneDNN in this torch")
    a, b, out = torch.ones(64, 8), torch.ones(8, 4), torch.empty(64, 4)
    if linear.available():
        gemm_into(out, a, b, 0.0, ROWS, built)
        assert torch.equal(out, torch.full((64, 4), 8.0))
    else:
        assert "AVX-512" in linear.unavailable_reason()
        with pytest.raises(RuntimeError, match="mkldnn_matmul"):
            gemm_into(out, a, b, 0.0, ROWS, built)


def _matrix(rows, cols, transposed, generator):
    if transposed:
        return torch.randn(cols, rows, generator=generator).T
    return torch.randn(rows, cols, generator=generator)


def _bound(a, b):
    # fp32 rounding of a k-term dot product: a few k * eps * sum |a||b|, per element
    scale = a.double().abs() @ b.double().abs()
    return 4 * a.shape[1] * torch.finfo(torch.float32).eps * scale + 1e-30


@pytest.mark.parametrize("varying", [ROWS, COLUMNS, INNER])
@pytest.mark.parametrize("size", VARYING_SIZES)
@pytest.mark.parametrize("layout", ["nn", "tn", "nt", "tt"])
def test_gemm_matches_float64(ops, varying, size, layout):
    g = torch.Generator().manual_seed(size * 10 + varying)
    m, n, k = 96, 80, 72
    m, n, k = (size, n, k) if varying == ROWS else (m, size, k) if varying == COLUMNS else (m, n, size)
    a, b = _matrix(m, k, layout[0] == "t", g), _matrix(k, n, layout[1] == "t", g)
    out = torch.full((m, n), float("nan"))
    gemm_into(out, a, b, 0.0, varying, ops)  # beta 0 overwrites, NaN included
    exact = a.double() @ b.double()
    assert ((out.double() - exact).abs() <= _bound(a, b)).all()


@pytest.mark.parametrize("varying", [ROWS, COLUMNS, INNER])
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_gemm_accumulates(ops, varying, beta):
    g = torch.Generator().manual_seed(7)
    m, n, k = (1100, 48, 40) if varying == ROWS else (48, 1100, 40) if varying == COLUMNS else (48, 40, 1100)
    a, b, c = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g), torch.randn(m, n, generator=g)
    expected = beta * c.double() + a.double() @ b.double()
    gemm_into(c, a, b, beta, varying, ops)
    assert ((c.double() - expected).abs() <= _bound(a, b) + 1e-6).all()


def test_gemm_of_an_empty_inner_dimension_scales(ops):
    c = torch.ones(8, 8)
    gemm_into(c, torch.empty(8, 0), torch.empty(0, 8), 0.5, INNER, ops)
    assert torch.equal(c, torch.full((8, 8), 0.5))


def test_gemm_rejects_bad_arguments(ops):
    with pytest.raises(RuntimeError, match="float32"):
        gemm_into(torch.empty(4, 4, dtype=torch.float64), torch.ones(4, 4), torch.ones(4, 4), 0.0, ROWS, ops)
    with pytest.raises(RuntimeError, match="do not match"):
        gemm_into(torch.empty(4, 5), torch.ones(4, 4), torch.ones(4, 4), 0.0, ROWS, ops)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [64, 777])
def test_fused_linear_forward_and_backward(ops, bias, tokens):
    g = torch.Generator().manual_seed(tokens + bias)
    x = torch.randn(2, tokens // 2 + 1, 48, generator=g).requires_grad_()
    w = (torch.randn(40, 48, generator=g) * 0.1).requires_grad_()
    b = torch.randn(40, generator=g).requires_grad_() if bias else None
    grad_y = torch.randn(2, tokens // 2 + 1, 40, generator=g)
    assert linear.supported(x, w, b)
    y = linear.fused_linear(x, w, b, ops)
    y.backward(grad_y)
    got = [y.detach(), x.grad, w.grad] + ([b.grad] if bias else [])
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    y64 = linear.reference_linear(x64, w64, b64)
    y64.backward(grad_y.double())
    want = [y64.detach(), x64.grad, w64.grad] + ([b64.grad] if bias else [])
    x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b32 = b.detach().clone().requires_grad_() if bias else None
    y32 = linear.reference_linear(x32, w32, b32)
    y32.backward(grad_y)
    eager = [y32.detach(), x32.grad, w32.grad] + ([b32.grad] if bias else [])
    for name, have, exact, default in zip(["y", "dx", "dw", "db"], got, want, eager):
        assert have.dtype == torch.float32 and have.shape == exact.shape, name
        error, default_error = (have.double() - exact).abs().max(), (default.double() - exact).abs().max()
        assert error <= 4 * default_error + 1e-6, (name, error.item(), default_error.item())


def test_fused_linear_skips_weight_gradient_of_frozen_weight(ops):
    x = torch.randn(100, 16, requires_grad=True)
    w = torch.randn(8, 16)
    linear.fused_linear(x, w, None, ops).sum().backward()
    assert w.grad is None and x.grad is not None


def test_supported_inputs():
    w = torch.randn(8, 16)
    assert linear.supported(torch.randn(64, 16), w)
    assert not linear.supported(torch.randn(63, 16), w)  # decoding-sized: F.linear
    assert not linear.supported(torch.randn(64, 16, dtype=torch.float64), w)
    assert not linear.supported(torch.randn(64, 15), w)
    assert not linear.supported(torch.randn(64, 16), w, torch.randn(8, dtype=torch.float64))


@pytest.mark.parametrize("rows,chunk", [(700, None), (700, 300), (130, 64)])
def test_fused_loss_on_onednn_products_matches_float64(ops, monkeypatch, rows, chunk):
    """With the CPU ops loaded, the fused loss's chunk products run on gemm_ and its per-row softmax
    step on vocab_major_cross_entropy_ (both counted), and still match the float64 reference across
    block boundaries of the varying dimension."""
    from engine.kernels.cpu import extension
    from tests.engine.kernels.cases import TOLERANCE, Case, measure_case

    calls = []

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ops, name)

    monkeypatch.setitem(extension._state, "ops", Counting())
    case = Case("float32", rows, 5003, 0.3, True, chunk_size=chunk, hidden_size=96)
    result = measure_case(case, "torch")
    assert set(calls) == {"gemm_", "vocab_major_cross_entropy_"}, calls
    too_large = {name: e for name, e in result["errors"].items() if not e <= TOLERANCE["float32"]}
    assert not too_large, too_large
