"""The torch backend of masked_linear_cross_entropy against the float64 reference, and its contract."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from engine.kernels import KernelArgumentError, masked_linear_cross_entropy, reference_masked_linear_cross_entropy
from engine.kernels.contract import resolve_backend
from engine.kernels.masked_linear_ce import (
    CHUNK_ROW_MULTIPLE,
    CPU_LOGITS_SHARE_OF_GRADIENTS,
    CPU_MIN_CHUNK_LOGITS_BYTES,
    balanced_chunk_rows,
    default_chunk_rows,
)
from tests.engine.kernels.cases import IGNORE_INDEX, TOLERANCE, Case, make_inputs, measure_case, relative_error

DTYPES = ("float32", "bfloat16")
VOCABS = (6400, 32000, 5003)

GRID = [
    Case(dtype, rows, vocab, masked, bias)
    for dtype, rows, vocab, masked, bias in itertools.product(DTYPES, (1, 37), VOCABS, (0.0, 0.5), (False, True))
]
LARGE_LOGITS = [
    Case(dtype, 37, vocab, 0.5, bias, max_logit=1e4)
    for dtype, vocab, bias in itertools.product(DTYPES, (6400, 5003), (False, True))
]
CHUNKINGS = [Case("float32", 37, 5003, 0.5, True, chunk_size=size) for size in (1, 5, 1000)]


def assert_matches_reference(case: Case, backend: str = "torch") -> None:
    result = measure_case(case, backend)
    tolerance = TOLERANCE[case.dtype]
    too_large = {name: error for name, error in result["errors"].items() if not error <= tolerance}
    assert not too_large, f"{case.name}: relative errors above {tolerance}: {too_large}"
    assert result["n_target"] == result["expected_n_target"]
    assert result["loss_dtype"] == "torch.float32"
    assert result["grads_finite"] and result["grad_dtypes_match"]


@pytest.mark.parametrize("case", GRID + LARGE_LOGITS + CHUNKINGS, ids=lambda case: case.name)
def test_matches_float64_reference(case: Case) -> None:
    assert_matches_reference(case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", (False, True))
def test_all_rows_masked_gives_zero_loss_count_and_gradients(dtype: str, bias: bool) -> None:
    result = measure_case(Case(dtype, 37, 5003, 1.0, bias), "torch")
    assert result["loss"] == 0.0 and result["n_target"] == 0
    assert result["grads_all_zero"] and result["grads_finite"]


def test_masked_rows_never_reach_the_matmul() -> None:
    """NaN hidden states on prompt rows must not leak into the loss or any gradient."""
    inputs = make_inputs(Case("float32", 37, 5003, 0.5, True))
    masked = inputs.labels == IGNORE_INDEX
    poisoned = inputs.hidden.detach().clone()
    poisoned[masked] = float("nan")
    poisoned.requires_grad_(True)
    loss_sum, _ = masked_linear_cross_entropy(poisoned, inputs.weight, inputs.labels, bias=inputs.bias)
    loss_sum.backward()
    expected = reference_masked_linear_cross_entropy(inputs.hidden, inputs.weight, inputs.labels, bias=inputs.bias)
    assert relative_error(loss_sum, expected.loss_sum) <= TOLERANCE["float32"]
    assert relative_error(inputs.weight.grad, expected.grad_weight) <= TOLERANCE["float32"]
    assert bool((poisoned.grad[masked] == 0).all())


def test_one_unmasked_prompt_token_is_detected() -> None:
    """Mutation check: the reference comparison is sharp enough to see a single leaked prompt row."""
    case = Case("float32", 37, 5003, 0.5, False)
    inputs = make_inputs(case)
    loss_sum, _ = masked_linear_cross_entropy(inputs.hidden, inputs.weight, inputs.labels)
    leaked_labels = inputs.labels.clone()
    first_prompt_row = int(torch.nonzero(leaked_labels == IGNORE_INDEX)[0])
    leaked_labels[first_prompt_row] = 7
    leaked = reference_masked_linear_cross_entropy(inputs.hidden, inputs.weight, leaked_labels)
    assert relative_error(loss_sum, leaked.loss_sum) > 100 * TOLERANCE["float32"]


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor produced by an aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        sizes = [leaf.numel() for leaf in tree_leaves(output) if isinstance(leaf, torch.Tensor)]
        self.largest = max([self.largest] + sizes)
        return output


def test_no_tensor_larger_than_one_chunk_of_logits_exists() -> None:
    case = Case("float32", 64, 5003, 0.25, True, hidden_size=8)
    inputs = make_inputs(case)
    chunk_size = 16
    with _LargestOutput() as recorder:
        loss_sum, _ = masked_linear_cross_entropy(
            inputs.hidden, inputs.weight, inputs.labels, bias=inputs.bias, chunk_size=chunk_size
        )
        loss_sum.backward()
    # [chunk, V] logits and the [V, d] gradient are the largest tensors; [kept, V] must never exist.
    assert recorder.largest == max(chunk_size * case.vocab, case.vocab * case.hidden_size)


@pytest.mark.parametrize("n_rows,hidden_size,vocab", [(4096, 1024, 32000), (16384, 4096, 32000), (8192, 896, 151936)])
def test_default_cpu_chunk_takes_its_share_of_the_gradient_buffers(n_rows: int, hidden_size: int, vocab: int) -> None:
    """The CPU logits buffer is as large as the memory goal allows (speed) and no larger (memory)."""
    rows = default_chunk_rows(n_rows, hidden_size, vocab, torch.device("cpu"))
    budget = CPU_LOGITS_SHARE_OF_GRADIENTS * 4 * (vocab + n_rows) * hidden_size
    assert rows % CHUNK_ROW_MULTIPLE == 0
    assert rows * vocab * 4 <= budget < (rows + CHUNK_ROW_MULTIPLE) * vocab * 4


@pytest.mark.parametrize("n_kept,max_rows", [(2048, 240), (1, 240), (240, 240), (241, 240), (5000, 7), (100000, 1766)])
def test_balanced_chunks_keep_the_chunk_count_and_never_exceed_the_budget(n_kept: int, max_rows: int) -> None:
    rows = balanced_chunk_rows(n_kept, max_rows)
    assert 1 <= rows <= max_rows
    assert -(-n_kept // rows) == -(-n_kept // max_rows)
    assert rows * (-(-n_kept // rows)) - n_kept < -(-n_kept // rows) * 8  # chunks differ by < 8 rows of slack


def test_default_cpu_chunk_of_a_small_shape_gets_the_minimum_budget() -> None:
    rows = default_chunk_rows(37, 64, 5003, torch.device("cpu"))
    assert rows * 5003 * 4 <= CPU_MIN_CHUNK_LOGITS_BYTES < (rows + CHUNK_ROW_MULTIPLE) * 5003 * 4


def test_loss_without_gradients_equals_training_loss() -> None:
    inputs = make_inputs(Case("float32", 37, 6400, 0.5, True))
    loss_with_grad, _ = masked_linear_cross_entropy(inputs.hidden, inputs.weight, inputs.labels, bias=inputs.bias)
    with torch.no_grad():
        loss_no_grad, count = masked_linear_cross_entropy(inputs.hidden, inputs.weight, inputs.labels, bias=inputs.bias)
    assert not loss_no_grad.requires_grad and count.dtype == torch.int64 and not count.requires_grad
    assert relative_error(loss_no_grad, loss_with_grad.detach()) <= 1e-6


def test_int32_labels_and_frozen_weight() -> None:
    inputs = make_inputs(Case("float32", 37, 5003, 0.5, False))
    weight = inputs.weight.detach()
    loss_sum, _ = masked_linear_cross_entropy(inputs.hidden, weight, inputs.labels.to(torch.int32))
    loss_sum.backward()
    expected = reference_masked_linear_cross_entropy(inputs.hidden, weight, inputs.labels)
    assert weight.grad is None
    assert relative_error(inputs.hidden.grad, expected.grad_hidden) <= TOLERANCE["float32"]


def test_second_backward_raises() -> None:
    inputs = make_inputs(Case("float32", 5, 5003, 0.0, False))
    loss_sum, _ = masked_linear_cross_entropy(inputs.hidden, inputs.weight, inputs.labels)
    loss_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss_sum.backward()


def _bad_arguments() -> list[tuple[str, dict]]:
    hidden, weight, labels = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, -100, 3])
    return [
        ("hidden", dict(hidden=hidden[None], weight=weight, labels=labels)),
        ("weight", dict(hidden=hidden, weight=torch.randn(10, 9), labels=labels)),
        ("labels", dict(hidden=hidden, weight=weight, labels=labels[:3])),
        ("labels", dict(hidden=hidden, weight=weight, labels=labels.float())),
        ("labels", dict(hidden=hidden, weight=weight, labels=torch.tensor([1, 2, 10, 3]))),
        ("hidden/weight dtypes", dict(hidden=hidden.double(), weight=weight.double(), labels=labels)),
        ("bias", dict(hidden=hidden, weight=weight, labels=labels, bias=torch.randn(9))),
        ("chunk_size", dict(hidden=hidden, weight=weight, labels=labels, chunk_size=0)),
        ("backend", dict(hidden=hidden, weight=weight, labels=labels, backend="cuda")),
    ]


@pytest.mark.parametrize("argument,kwargs", _bad_arguments(), ids=lambda value: str(value)[:20])
def test_bad_arguments_raise_naming_the_argument(argument: str, kwargs: dict) -> None:
    with pytest.raises(KernelArgumentError, match=argument):
        masked_linear_cross_entropy(**kwargs)


def test_auto_backend_is_torch_on_cpu() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter makes Triton valid on CPU")
def test_triton_backend_on_cpu_without_interpreter_raises() -> None:
    with pytest.raises(KernelArgumentError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"))
