"""FusedLMHead: swapped in for the lm_head without changing the model (parameters, names, ties,
logits), and the module whose forward runs the fused loss."""

from __future__ import annotations

import inspect

import pytest
import torch

from data_pipeline.schedule.collate import LoadedSample, collate_rows
from engine.fused_head import FusedLMHead
from engine.loss import CausalLMWithMaskedLoss
from tests.engine import grad_probe


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_swap_keeps_parameters_names_ties_and_logits(tie):
    lm = grad_probe.tiny_model(tie=tie)
    before = lm.state_dict()
    original = lm.get_output_embeddings()
    ids = torch.randint(3, grad_probe.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    logits = lm(input_ids=ids).logits.detach()

    wrapped = CausalLMWithMaskedLoss(lm, num_sources=2, backend="torch")
    head = lm.get_output_embeddings()
    assert isinstance(head, FusedLMHead) and head is lm.lm_head
    assert head.weight is original.weight  # the same Parameter: no copy, optimizer and ZeRO see one tensor
    assert (head.weight is lm.get_input_embeddings().weight) == tie
    assert list(wrapped.lm.state_dict()) == list(before)  # checkpoints and the export keep their keys
    assert [n for n, _ in wrapped.named_parameters()] == [f"lm.{n}" for n, _ in lm.named_parameters()]
    torch.testing.assert_close(lm(input_ids=ids).logits, logits)  # without targets: the plain Linear


def test_micro_batch_model_inputs_are_the_training_forward_arguments():
    rows = [[LoadedSample(0, 0, torch.arange(3, 8).numpy(), torch.arange(3, 8).numpy())]]
    batch = collate_rows(rows, 6, pad_id=0)
    forward = set(inspect.signature(CausalLMWithMaskedLoss.forward).parameters) - {"self"}
    shard = batch.sequence_shard(1, 2)  # sequence parallelism: targets shifted before the cut, no mask
    assert set(batch.model_inputs()) == forward - {"targets"}
    assert set(shard.model_inputs()) == forward - {"labels", "attention_mask"}
    assert "source_index" not in batch.model_inputs(per_source=False)
