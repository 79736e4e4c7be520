"""The fused loss's per-row cross-entropy step on CPU (engine/kernels/cpu/vocab_major_ce.py) against
float64: losses and softmax - onehot over vocabulary and row counts with vector tails, large logits,
a large vocabulary, labels at both ends; results independent of the thread count; other layouts
fall back to the torch version; the fused loss really calls the kernel."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import masked_linear_cross_entropy, reference_masked_linear_cross_entropy
from engine.kernels.cpu import extension
from engine.kernels.cpu.vocab_major_ce import supported, vocab_major_cross_entropy_
from engine.kernels.row_cross_entropy_torch import row_cross_entropy_torch_


def _vocab_major(rows: int, vocab: int, scale: float, seed: int) -> torch.Tensor:
    """A [rows, V] view of a contiguous [V, rows] block, as the CPU chunk loop forms it."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(vocab, rows, generator=g) * scale).T


def _reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.double()
    loss = torch.logsumexp(x, dim=1) - x.gather(1, labels[:, None]).squeeze(1)
    grad = torch.softmax(x, dim=1)
    grad[torch.arange(len(labels)), labels] -= 1
    return loss, grad


@pytest.mark.parametrize("vocab", [1, 7, 100, 6400])
@pytest.mark.parametrize("rows", [1, 5, 8, 17, 64])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_matches_float64_reference(ops, vocab, rows, scale):
    logits = _vocab_major(rows, vocab, scale, seed=vocab * 100 + rows)
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(rows))
    want_loss, want_grad = _reference(logits, labels)
    eager = logits.T.clone().T
    eager_loss = row_cross_entropy_torch_(eager, labels, True)
    got = logits.T.clone().T
    got_loss = vocab_major_cross_entropy_(got, labels, True, ops)
    # within a few times the torch version's own float32 error (and never worse than 2e-6 of the loss scale)
    loss_err, eager_loss_err = ((x.double() - want_loss).abs().max().item() for x in (got_loss, eager_loss))
    assert loss_err <= max(4 * eager_loss_err, 2e-6 * max(1.0, want_loss.abs().max().item())), (loss_err, eager_loss_err)
    grad_err, eager_grad_err = ((x.double() - want_grad).abs().max().item() for x in (got, eager))
    assert grad_err <= max(4 * eager_grad_err, 1e-6), (grad_err, eager_grad_err)


def test_without_gradient_the_logits_become_the_exponentials_and_the_loss_is_the_same(ops):
    logits = _vocab_major(9, 300, 3.0, seed=3)
    labels = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(3))
    with_grad = vocab_major_cross_entropy_(logits.T.clone().T, labels, True, ops)
    without = logits.T.clone().T
    loss = vocab_major_cross_entropy_(without, labels, False, ops)
    assert torch.equal(loss, with_grad)
    shifted = torch.exp(logits.double() - logits.double().amax(dim=1, keepdim=True))
    torch.testing.assert_close(without.double(), shifted, rtol=1e-5, atol=1e-7)


def test_labels_at_both_ends_and_huge_logits_stay_finite(ops):
    logits = _vocab_major(16, 50, 1.0, seed=4)
    logits[0] = 1e4  # every column equal and huge
    logits[1, 7] = -1e4
    logits[2, 49] = 5e3
    labels = torch.tensor([0, 49] * 8)
    want_loss, want_grad = _reference(logits, labels)
    got = logits.T.clone().T
    loss = vocab_major_cross_entropy_(got, labels, True, ops)
    assert torch.isfinite(loss).all() and torch.isfinite(got).all()
    # max + log(sum) - x[label] near 1e4 keeps float32's ulp there (1e-3), as the torch version does
    eager_loss = row_cross_entropy_torch_(logits.T.clone().T, labels, False)
    loss_err, eager_err = ((x.double() - want_loss).abs().max().item() for x in (loss, eager_loss))
    assert loss_err <= max(eager_err, 1e-5), (loss_err, eager_err)
    torch.testing.assert_close(got.double(), want_grad, rtol=1e-5, atol=1e-6)


def test_large_vocabulary_sum_keeps_its_accuracy(ops):
    """The exponentials' sum is compensated: 150k terms do not pile up float32 rounding."""
    logits = _vocab_major(24, 151_936, 2.0, seed=5)
    labels = torch.randint(0, 151_936, (24,), generator=torch.Generator().manual_seed(5))
    want_loss, want_grad = _reference(logits, labels)
    got = logits.T.clone().T
    loss = vocab_major_cross_entropy_(got, labels, True, ops)
    assert (loss.double() - want_loss).abs().max().item() < 1e-5
    assert (got.double() - want_grad).abs().max().item() < 1e-6
    # softmax rows sum to 1 (the label's -1 put back) to within a few float32 ulp
    probs = got.double()
    probs[torch.arange(24), labels] += 1
    assert (probs.sum(dim=1) - 1).abs().max().item() < 5e-7


def test_results_do_not_depend_on_the_thread_count(ops):
    logits = _vocab_major(203, 640, 4.0, seed=6)
    labels = torch.randint(0, 640, (203,), generator=torch.Generator().manual_seed(6))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got = logits.T.clone().T
            results.append((vocab_major_cross_entropy_(got, labels, True, ops), got))
    finally:
        torch.set_num_threads(before)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_other_layouts_go_to_the_torch_version(ops):
    g = torch.Generator().manual_seed(7)
    row_major = torch.randn(6, 40, generator=g)
    labels = torch.randint(0, 40, (6,), generator=g)
    assert supported(row_major.T.contiguous().T, labels)
    assert not supported(row_major, labels)
    assert not supported(row_major.T.contiguous().T.double(), labels)
    assert not supported(row_major.T.contiguous().T, labels.int())
    want = row_major.clone()
    want_loss = row_cross_entropy_torch_(want, labels, True)
    got = row_major.clone()
    got_loss = vocab_major_cross_entropy_(got, labels, True, ops)
    assert torch.equal(got_loss, want_loss) and torch.equal(got, want)


def test_the_fused_loss_runs_the_kernel_and_matches_its_reference(ops, monkeypatch):
    calls = []

    class Counting:
        def __getattr__(self, name):
            def call(*args):
                calls.append(name)
                return getattr(ops, name)(*args)
            return call

    monkeypatch.setitem(extension._state, "ops", Counting())
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(70, 32, generator=g, requires_grad=True)
    weight = torch.randn(500, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 500, (70,), generator=g)
    labels[::3] = -100
    loss, count = masked_linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    loss.backward()
    assert calls.count("vocab_major_cross_entropy_") == 3  # 46 kept rows in chunks of 16
    want = reference_masked_linear_cross_entropy(hidden, weight, labels)
    assert count.item() == want.n_target_tokens.item()
    torch.testing.assert_close(loss.double(), want.loss_sum, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), want.grad_hidden, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), want.grad_weight, rtol=1e-4, atol=1e-6)
