"""The per-chunk row step of the torch backend: row maximum on both logits layouts."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.row_cross_entropy_torch import MAX_FOLD_BLOCK, row_cross_entropy_torch_, row_max_of


def _vocab_major(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """A [rows, V] view of a contiguous [V, rows] block, as the CPU chunk loop lays logits out."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, rows, generator=generator).mul_(30.0).T


@pytest.mark.parametrize("rows", (1, 7, 240))
@pytest.mark.parametrize("vocab", (2 * MAX_FOLD_BLOCK, 2 * MAX_FOLD_BLOCK + 1, 5003, 32000))
def test_row_max_of_vocab_major_equals_amax(rows: int, vocab: int) -> None:
    logits = _vocab_major(rows, vocab)
    # Put each row's maximum in the last, partial fold block, where an off-by-one would miss it.
    logits[:, -1] = 1e4
    logits[0, vocab // 2] = 2e4
    expected = logits.amax(dim=1, keepdim=True)
    assert torch.equal(row_max_of(logits), expected)


def test_row_max_of_propagates_nan_like_amax() -> None:
    logits = _vocab_major(3, 4 * MAX_FOLD_BLOCK)
    logits[1, 2 * MAX_FOLD_BLOCK + 5] = float("nan")
    result = row_max_of(logits)
    assert torch.isnan(result[1, 0]) and not torch.isnan(result[[0, 2], 0]).any()


def test_row_max_of_row_major_equals_amax() -> None:
    logits = torch.randn(5, 4 * MAX_FOLD_BLOCK)
    assert torch.equal(row_max_of(logits), logits.amax(dim=1, keepdim=True))


def test_row_step_is_layout_independent() -> None:
    vocab_major = _vocab_major(9, 6400, seed=1)
    row_major = vocab_major.contiguous()
    labels = torch.randint(0, 6400, (9,), generator=torch.Generator().manual_seed(2))
    loss_vocab_major = row_cross_entropy_torch_(vocab_major, labels, write_grad=True)
    loss_row_major = row_cross_entropy_torch_(row_major, labels, write_grad=True)
    torch.testing.assert_close(loss_vocab_major, loss_row_major, rtol=1e-6, atol=0)
    torch.testing.assert_close(vocab_major, row_major, rtol=1e-6, atol=1e-12)
