"""LoRA gradients through DeepSpeed (2 ranks, gloo): ZeRO-3 equals ZeRO-0, and both equal the float64
definition, grad of (sum of response-token CE) / (their count), with the fused loss in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.schedule.labels import IGNORE_INDEX, shift_labels
from tests.engine import grad_probe
from tests.engine.test_loss import _assert_grads_match, _probe

pytestmark = [pytest.mark.distributed]


def _lora_reference(save_head: bool) -> tuple[dict, float]:
    """One process, float64, the whole global batch, plain HF logits: the right answer."""
    from engine.loss import CausalLMWithMaskedLoss

    wrapped = CausalLMWithMaskedLoss(grad_probe.tiny_model(), fused=False)
    wrapped.lm = grad_probe.with_lora(wrapped.lm, 4, save_head)
    wrapped = wrapped.double()
    batch = grad_probe.global_batch()
    logits = wrapped.lm(input_ids=batch["input_ids"]).logits
    targets = shift_labels(batch["labels"])
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    (loss_sum / int((targets != IGNORE_INDEX).sum())).backward()
    grads = {n: p.grad.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    return grads, float(loss_sum.detach())


@pytest.mark.parametrize("save_head", [False, True], ids=["adapters", "adapters+lm_head"])
def test_lora_gradients_zero3_equal_zero0_and_the_definition(tmp_path, save_head):
    extra = ("--lora", "4") + (("--lora-save-head",) if save_head else ())
    zero0 = _probe(tmp_path, 2, 2, 2, 0, *extra)
    zero3 = _probe(tmp_path, 2, 2, 2, 3, *extra)
    want, loss_sum = _lora_reference(save_head)
    assert set(zero3["grads"]) == set(want)  # exactly the trainable parameters, nothing frozen
    assert all(".lora_" in n or "modules_to_save" in n for n in want)
    assert any("modules_to_save" in n for n in want) == save_head
    assert zero3["loss_sum"] == pytest.approx(zero0["loss_sum"], rel=1e-6)
    assert zero3["loss_sum"] == pytest.approx(loss_sum, rel=1e-5)
    _assert_grads_match(zero3["grads"], zero0["grads"], rel=1e-5)
    _assert_grads_match(zero3["grads"], want, rel=1e-5)
    assert all(float(g.norm()) > 0 for g in want.values())  # both A and B receive gradient
