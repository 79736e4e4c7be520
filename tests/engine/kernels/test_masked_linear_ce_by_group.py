"""masked_linear_cross_entropy_by_group: per-group sums and counts in one pass, gradients of their sum."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import (
    KernelArgumentError,
    masked_linear_cross_entropy,
    masked_linear_cross_entropy_by_group,
    reference_masked_linear_cross_entropy,
)
from tests.engine.kernels.cases import IGNORE_INDEX, TOLERANCE, Case, make_inputs, relative_error


def _groups(rows: int, num_groups: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, num_groups, (rows,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
@pytest.mark.parametrize("num_groups", (1, 3))
def test_group_sums_and_counts_match_the_reference_per_group(dtype: str, num_groups: int) -> None:
    case = Case(dtype, 41, 5003, 0.5, True)
    inputs = make_inputs(case)
    groups = _groups(case.rows, num_groups)
    loss_sums, counts = masked_linear_cross_entropy_by_group(
        inputs.hidden, inputs.weight, inputs.labels, groups, num_groups, bias=inputs.bias, backend="torch"
    )
    assert loss_sums.shape == (num_groups,) and loss_sums.dtype == torch.float32
    for group in range(num_groups):
        labels = torch.where(groups == group, inputs.labels, IGNORE_INDEX)
        expected = reference_masked_linear_cross_entropy(inputs.hidden, inputs.weight, labels, IGNORE_INDEX, inputs.bias)
        assert int(counts[group]) == int(expected.n_target_tokens)
        assert relative_error(loss_sums[group].detach(), expected.loss_sum) <= TOLERANCE[dtype]


def test_gradients_of_the_sum_equal_the_ungrouped_call_and_scale_with_the_upstream_gradient() -> None:
    case = Case("float32", 41, 6400, 0.3, True)
    grouped, plain = make_inputs(case), make_inputs(case)
    loss_sums, _ = masked_linear_cross_entropy_by_group(
        grouped.hidden, grouped.weight, grouped.labels, _groups(case.rows, 4), 4, bias=grouped.bias, backend="torch"
    )
    (loss_sums.sum() * 0.25).backward()
    loss_sum, _ = masked_linear_cross_entropy(plain.hidden, plain.weight, plain.labels, bias=plain.bias, backend="torch")
    (loss_sum * 0.25).backward()
    torch.testing.assert_close(loss_sums.sum(), loss_sum, rtol=1e-6, atol=0)
    for name in ("hidden", "weight", "bias"):
        torch.testing.assert_close(getattr(grouped, name).grad, getattr(plain, name).grad, rtol=1e-6, atol=1e-9)


def test_unequal_upstream_gradients_raise_instead_of_a_wrong_gradient() -> None:
    inputs = make_inputs(Case("float32", 16, 2000, 0.0, False))
    loss_sums, _ = masked_linear_cross_entropy_by_group(
        inputs.hidden, inputs.weight, inputs.labels, torch.arange(16) % 2, 2, backend="torch"
    )
    with pytest.raises(RuntimeError, match="different upstream gradients"):
        (loss_sums * torch.tensor([1.0, 2.0])).sum().backward()


def test_rows_without_a_target_may_carry_any_group_id() -> None:
    """Padding in a packed batch has source index -1; only rows with a target are grouped."""
    inputs = make_inputs(Case("float32", 12, 2000, 0.0, False))
    groups = torch.arange(12) % 2
    groups[-3:] = -1
    inputs.labels[-3:] = IGNORE_INDEX
    loss_sums, counts = masked_linear_cross_entropy_by_group(
        inputs.hidden, inputs.weight, inputs.labels, groups, 2, backend="torch"
    )
    assert counts.tolist() == [5, 4] and loss_sums.shape == (2,)


def test_a_group_without_targets_gets_zero_loss_and_count() -> None:
    inputs = make_inputs(Case("float32", 12, 2000, 0.0, False))
    groups = torch.zeros(12, dtype=torch.int64)
    groups[6:] = 2
    inputs.labels[6:] = IGNORE_INDEX
    loss_sums, counts = masked_linear_cross_entropy_by_group(
        inputs.hidden, inputs.weight, inputs.labels, groups, 3, backend="torch"
    )
    assert counts.tolist() == [6, 0, 0]
    assert loss_sums[1].item() == 0.0 and loss_sums[2].item() == 0.0 and loss_sums[0].item() > 0


@pytest.mark.parametrize(
    "groups,num_groups,match",
    [
        (torch.zeros(8, dtype=torch.int64), 0, "num_groups"),
        (torch.zeros(7, dtype=torch.int64), 2, "groups: expected shape"),
        (torch.zeros(8), 2, "groups: expected int32 or int64"),
        (torch.full((8,), 2), 2, r"groups: rows with a target must be in groups \[0, 2\)"),
    ],
)
def test_bad_groups_raise_naming_the_argument(groups: torch.Tensor, num_groups: int, match: str) -> None:
    inputs = make_inputs(Case("float32", 8, 100, 0.0, False))
    with pytest.raises(KernelArgumentError, match=match):
        masked_linear_cross_entropy_by_group(inputs.hidden, inputs.weight, inputs.labels, groups, num_groups)
