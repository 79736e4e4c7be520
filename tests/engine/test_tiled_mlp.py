"""Tiled MLP (engine/tiled_mlp.py): the same loss and gradients as the plain MLP, in one process."""

from __future__ import annotations

import pytest
import torch

from engine.loss import CausalLMWithMaskedLoss
from engine.tiled_mlp import install_tiled_mlp
from tests.engine import grad_probe


def _loss_and_grads(shards: int):
    model = CausalLMWithMaskedLoss(grad_probe.tiny_model().double(), fused=False)  # float64: plain head
    if shards:
        assert install_tiled_mlp(model.lm, shards) == 2
    batch = grad_probe.global_batch()
    loss, _ = model(batch["input_ids"], batch["labels"])
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("shards", [2, 5])
def test_tiled_mlp_gives_the_plain_loss_and_gradients(shards):
    want_loss, want = _loss_and_grads(0)
    got_loss, got = _loss_and_grads(shards)
    torch.testing.assert_close(got_loss, want_loss)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
    assert any(float(want[n].abs().sum()) > 0 for n in want if ".mlp." in n)


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="train.tiled_mlp: no decoder block"):
        install_tiled_mlp(torch.nn.Linear(2, 2), 2)
