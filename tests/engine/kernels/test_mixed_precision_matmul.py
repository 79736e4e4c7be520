"""fp32 products and accumulation from half inputs, including the fallbacks taken when a way is refused."""

from __future__ import annotations

import warnings

import pytest
import torch

import engine.kernels.mixed_precision_matmul as mpm


@pytest.fixture
def fresh_ways(monkeypatch):
    """Each test probes the accumulation ways from the start, and leaves the module's list alone."""
    monkeypatch.setattr(mpm, "_HALF_ACCUMULATE_WAYS", list(mpm._HALF_ACCUMULATE_WAYS))
    return mpm._HALF_ACCUMULATE_WAYS


def _operands(dtype: torch.dtype, rows: int = 37, inner: int = 19, cols: int = 11):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=generator).to(dtype)
    b = torch.randn(inner, cols, generator=generator).to(dtype)
    start = torch.randn(rows, cols, generator=generator)
    return a, b, start


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_half_accumulation_is_exact_in_fp32_through_the_fallbacks(dtype, fresh_ways, monkeypatch):
    monkeypatch.setattr(mpm, "ROW_SLICE_TEMPORARY_ELEMENTS", 5 * 11)  # several row slices
    a, b, start = _operands(dtype)
    accumulator = start.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mpm.addmm_fp32_(accumulator, a, b)
        mpm.addmm_fp32_(accumulator, a, b)
    expected = start.double() + 2 * (a.double() @ b.double())
    torch.testing.assert_close(accumulator.double(), expected, rtol=1e-6, atol=1e-5)
    # On CPU neither fused way exists: each is refused once, then the row slices serve every call.
    assert [name for name, _ in fresh_ways] == ["row slices of fp32 products"]
    assert len(caught) == 2 and "baddbmm" in str(caught[0].message)


def test_a_refused_way_leaves_the_accumulator_untouched_and_the_next_way_runs(fresh_ways):
    calls = []

    def refuses(accumulator, a, b):
        calls.append("refused")
        raise RuntimeError("not for these dtypes\nsecond line")

    def works(accumulator, a, b):
        calls.append("works")
        accumulator.add_(1.0)

    fresh_ways[:] = [("refusing way", refuses), ("working way", works), ("last", works)]
    accumulator = torch.zeros(2, 2)
    with pytest.warns(UserWarning, match=r"refusing way unavailable \(not for these dtypes\); trying working way"):
        mpm.addmm_fp32_(accumulator, *_operands(torch.bfloat16, 2, 3, 2)[:2])
    mpm.addmm_fp32_(accumulator, *_operands(torch.bfloat16, 2, 3, 2)[:2])
    assert calls == ["refused", "works", "works"]
    assert torch.equal(accumulator, torch.full((2, 2), 2.0))


def test_fp32_inputs_take_the_plain_addmm(fresh_ways):
    a, b, start = _operands(torch.float32)
    accumulator = start.clone()
    mpm.addmm_fp32_(accumulator, a, b)
    torch.testing.assert_close(accumulator, torch.addmm(start, a, b))
    assert len(fresh_ways) == 3  # nothing probed


def test_matmul_operand_upcasts_half_on_cpu_and_leaves_fp32_alone():
    weight = torch.randn(4, 3, dtype=torch.bfloat16)
    assert mpm.matmul_operand(weight).dtype == torch.float32
    weight_fp32 = weight.float()
    assert mpm.matmul_operand(weight_fp32) is weight_fp32
