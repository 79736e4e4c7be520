"""Every backend and strategy on a CUDA device against the float64 reference, and their memory.

Skipped without CUDA (the default CPU run). On a GPU machine:
    python3 -m pytest -q -m gpu tests/engine/kernels
"""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.kernels import masked_linear_cross_entropy, reference_masked_linear_cross_entropy
from tests.engine.kernels.cases import GRAD_SCALE, IGNORE_INDEX, TOLERANCE, Case, make_inputs, relative_error

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

pytestmark = [pytest.mark.gpu]

WAYS = [("triton", "row_chunks"), ("torch", "row_chunks"), ("torch", "vocab_blocks")]
CASES = [
    Case(dtype, rows, vocab, masked, bias, max_logit=max_logit, hidden_size=hidden_size)
    for dtype, (rows, vocab, hidden_size), masked, bias, max_logit in itertools.product(
        ("float32", "bfloat16"),
        ((1, 5003, 24), (300, 151936, 128), (1037, 32000, 256)),
        (0.0, 0.5),
        (False, True),
        (None, 1e4),
    )
]


def _on_cuda(case: Case):
    inputs = make_inputs(case)
    move = lambda t: None if t is None else t.detach().cuda().requires_grad_(True)  # noqa: E731
    return move(inputs.hidden), move(inputs.weight), move(inputs.bias), inputs.labels.cuda()


@pytest.mark.parametrize("way", WAYS, ids=lambda way: "-".join(way))
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_matches_float64_reference_on_cuda(case: Case, way: tuple[str, str]) -> None:
    backend, strategy = way
    hidden, weight, bias, labels = _on_cuda(case)
    loss_sum, n_target = masked_linear_cross_entropy(hidden, weight, labels, IGNORE_INDEX, bias, None, backend, strategy)
    (loss_sum * GRAD_SCALE).backward()
    expected = reference_masked_linear_cross_entropy(hidden, weight, labels, IGNORE_INDEX, bias, GRAD_SCALE)
    errors = {
        "loss": relative_error(loss_sum, expected.loss_sum),
        "grad_hidden": relative_error(hidden.grad, expected.grad_hidden),
        "grad_weight": relative_error(weight.grad, expected.grad_weight),
    }
    if bias is not None:
        errors["grad_bias"] = relative_error(bias.grad, expected.grad_bias)
    too_large = {name: error for name, error in errors.items() if not error <= TOLERANCE[case.dtype]}
    assert not too_large, f"{case.name} {way}: relative errors above {TOLERANCE[case.dtype]}: {too_large}"
    assert int(n_target) == int(expected.n_target_tokens)
    assert weight.grad.dtype == weight.dtype and hidden.grad.dtype == hidden.dtype


@pytest.mark.parametrize("way", WAYS, ids=lambda way: "-".join(way))
def test_all_rows_masked_gives_zero_on_cuda(way: tuple[str, str]) -> None:
    hidden, weight, bias, labels = _on_cuda(Case("bfloat16", 64, 32000, 1.0, True))
    loss_sum, n_target = masked_linear_cross_entropy(hidden, weight, labels, IGNORE_INDEX, bias, None, *way)
    loss_sum.backward()
    assert loss_sum.item() == 0.0 and int(n_target) == 0
    assert all(int(torch.count_nonzero(t.grad)) == 0 for t in (hidden, weight, bias))


def _peak_extra_bytes(strategy: str) -> int:
    hidden, weight, _, labels = _on_cuda(Case("bfloat16", 4096, 151936, 0.5, False, hidden_size=896))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss_sum, _ = masked_linear_cross_entropy(hidden, weight, labels, strategy=strategy)
    loss_sum.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def test_vocab_blocks_needs_less_memory_than_row_chunks_for_bf16() -> None:
    """The reason vocab_blocks exists: no fp32 [V, d] accumulator beside a bf16 weight."""
    weight_gradient_bytes = 151936 * 896 * 2
    row_chunks, vocab_blocks = _peak_extra_bytes("row_chunks"), _peak_extra_bytes("vocab_blocks")
    assert vocab_blocks < row_chunks
    assert row_chunks >= 3 * weight_gradient_bytes  # fp32 accumulator (2x) + the bf16 gradient
    assert vocab_blocks < 2 * weight_gradient_bytes, (vocab_blocks, weight_gradient_bytes)
