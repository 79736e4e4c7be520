"""The vocab_blocks strategy against the float64 reference, and what it promises about memory."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from engine.kernels import masked_linear_cross_entropy, masked_linear_cross_entropy_by_group
from engine.kernels.vocab_blocked_ce import BLOCK_COLUMN_MULTIPLE, default_block_columns
from tests.engine.kernels.cases import IGNORE_INDEX, TOLERANCE, Case, make_inputs, measure_case

GRID = [
    Case(dtype, rows, vocab, masked, bias, strategy="vocab_blocks")
    for dtype, rows, vocab, masked, bias in itertools.product(
        ("float32", "bfloat16"), (1, 37), (6400, 5003), (0.0, 0.5), (False, True)
    )
]
LARGE_LOGITS = [
    Case(dtype, 37, 5003, 0.5, True, max_logit=1e4, strategy="vocab_blocks") for dtype in ("float32", "bfloat16")
]
# Blocks of one column, a size that divides nothing, one block holding the whole vocabulary.
BLOCKINGS = [Case("float32", 37, 5003, 0.5, True, chunk_size=size, strategy="vocab_blocks") for size in (1, 7, 5003)]


@pytest.mark.parametrize("case", GRID + LARGE_LOGITS + BLOCKINGS, ids=lambda case: case.name)
def test_matches_float64_reference(case: Case) -> None:
    result = measure_case(case, "torch")
    tolerance = TOLERANCE[case.dtype]
    too_large = {name: error for name, error in result["errors"].items() if not error <= tolerance}
    assert not too_large, f"{case.name}: relative errors above {tolerance}: {too_large}"
    assert result["n_target"] == result["expected_n_target"]
    assert result["grads_finite"] and result["grad_dtypes_match"]


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
def test_all_rows_masked_gives_zero_loss_and_gradients(dtype: str) -> None:
    result = measure_case(Case(dtype, 9, 700, 1.0, True, strategy="vocab_blocks"), "torch")
    assert result["loss"] == 0.0 and result["n_target"] == 0 and result["grads_all_zero"]


def test_same_loss_and_gradients_as_row_chunks() -> None:
    case = Case("float32", 37, 6400, 0.5, True, hidden_size=16)
    results = []
    for strategy in ("row_chunks", "vocab_blocks"):
        inputs = make_inputs(case)
        groups = torch.arange(case.rows) % 3
        loss_sums, counts = masked_linear_cross_entropy_by_group(
            inputs.hidden, inputs.weight, inputs.labels, groups, 3, bias=inputs.bias, strategy=strategy
        )
        loss_sums.sum().backward()
        results.append((loss_sums.detach(), counts, inputs.hidden.grad, inputs.weight.grad, inputs.bias.grad))
    for row_chunks, vocab_blocks in zip(*results):
        torch.testing.assert_close(vocab_blocks, row_chunks, rtol=2e-5, atol=1e-6)


class _Float32Outputs(TorchDispatchMode):
    """Records (storage address, element count) of every float32 tensor produced by an aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        self.outputs += [
            (t.untyped_storage().data_ptr(), t.numel())
            for t in tree_leaves(output)
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32
        ]
        return output


def test_the_weight_gradient_is_the_only_vocab_by_hidden_buffer() -> None:
    """No [V, d] accumulator beside the weight gradient, and nothing else above one logits block.
    (With fp32 inputs every buffer is fp32, so all of them are seen; for bf16 the gradient is
    allocated in the weight's dtype, which the reference grid checks.)"""
    case = Case("float32", 64, 5003, 0.25, True, hidden_size=8)
    inputs = make_inputs(case)
    block = 100
    with _Float32Outputs() as recorder:
        loss_sum, _ = masked_linear_cross_entropy(
            inputs.hidden, inputs.weight, inputs.labels, bias=inputs.bias, chunk_size=block, strategy="vocab_blocks"
        )
        loss_sum.backward()
    vocab_by_hidden = case.vocab * case.hidden_size
    large = {address for address, size in recorder.outputs if size >= vocab_by_hidden}
    assert large == {inputs.weight.grad.untyped_storage().data_ptr()}
    kept = int((inputs.labels != IGNORE_INDEX).sum())
    assert max(size for _, size in recorder.outputs if size < vocab_by_hidden) <= max(kept * block, case.vocab)


def test_default_block_fits_the_budget_in_whole_tiles() -> None:
    columns = default_block_columns(8192, 151936, torch.device("cpu"))
    assert columns % BLOCK_COLUMN_MULTIPLE == 0 and 4 * 8192 * columns <= 32 * 2**20
    assert default_block_columns(0, 5003, torch.device("cpu")) == 5003
    assert default_block_columns(10**9, 5003, torch.device("cpu")) == 1


def test_unknown_strategy_is_refused() -> None:
    inputs = make_inputs(Case("float32", 4, 50, 0.0, False))
    with pytest.raises(ValueError, match="strategy='blocks'"):
        masked_linear_cross_entropy(inputs.hidden, inputs.weight, inputs.labels, IGNORE_INDEX, strategy="blocks")
