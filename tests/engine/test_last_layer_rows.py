"""The last layer on target rows only (engine/last_layer_rows.py): the loss and every gradient stay
those of the whole model (padded rows, packed samples, LoRA adapters, the fused CPU layers); the
MLP and output projection really see only the target rows, and only inside the loss's forward;
models where the skip would be wrong are left alone and say why."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from engine.fused_layers import install_fused_layers
from engine.last_layer_rows import LastLayerRows, last_decoder_layer
from engine.loss import CausalLMWithMaskedLoss
from engine.segment_attention import use_segment_attention

SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SIZES))


def _padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, SIZES["vocab_size"], (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # the second row is padding from token 17 on
    labels = ids.clone()
    labels[:, :9] = -100  # prompts
    labels[1, 17:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _packed_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, SIZES["vocab_size"], (1, 40), generator=g)
    positions = torch.cat([torch.arange(15), torch.arange(25)]).unsqueeze(0)
    labels = ids.clone()
    labels[0, :6] = -100
    labels[0, 15:27] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def _loss_and_grads(model: CausalLMWithMaskedLoss, batch: dict):
    model.zero_grad(set_to_none=True)
    sums, counts = model(**batch)
    sums.sum().backward()
    return sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(got[1], want[1])
    assert set(got[2]) == set(want[2])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-7, msg=name)


def _rows_seen(module: torch.nn.Module) -> list[int]:
    """Rows each call of the module's own forward computes (set before `install`, which wraps it)."""
    seen: list[int] = []
    inner = module.forward

    def recording(x):
        seen.append(x.reshape(-1, x.shape[-1]).shape[0])
        return inner(x)

    module.forward = recording
    return seen


@pytest.mark.parametrize("batch", [_padded_batch, _packed_batch], ids=["padded", "packed"])
def test_loss_and_gradients_are_those_of_the_whole_model(batch):
    lm = _llama()
    if batch is _packed_batch:
        use_segment_attention(lm)
    whole = CausalLMWithMaskedLoss(copy.deepcopy(lm))
    skipping = CausalLMWithMaskedLoss(lm)
    layer = last_decoder_layer(skipping.lm)
    mlp_rows, o_rows = _rows_seen(layer.mlp), _rows_seen(layer.self_attn.o_proj)
    assert skipping.last_layer.install(skipping.lm).modules == ["self_attn.o_proj", "mlp"]
    inputs = batch()
    _assert_same(_loss_and_grads(skipping, inputs), _loss_and_grads(whole, inputs))
    targets = int((inputs["labels"][..., 1:] != -100).sum())
    assert mlp_rows == [targets] and o_rows == [targets]  # and fewer than all rows
    assert targets < inputs["input_ids"].numel()


def test_outside_the_loss_forward_every_row_is_computed():
    lm = _llama()
    plain = copy.deepcopy(lm)
    model = CausalLMWithMaskedLoss(lm)
    seen = _rows_seen(last_decoder_layer(model.lm).mlp)
    model.last_layer.install(model.lm)
    batch = _padded_batch()
    model(**batch)  # a training forward chose rows; they do not outlive it
    assert model.last_layer.rows is None and seen == [int((batch["labels"][..., 1:] != -100).sum())]
    seen.clear()
    with torch.no_grad():
        logits = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, want)
    assert seen == [batch["input_ids"].numel()]


def test_a_micro_batch_without_targets_runs_the_whole_layer():
    model = CausalLMWithMaskedLoss(_llama())
    seen = _rows_seen(last_decoder_layer(model.lm).mlp)
    model.last_layer.install(model.lm)
    batch = _padded_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    sums, counts = model(**batch)
    sums.sum().backward()
    assert seen == [batch["input_ids"].numel()] and counts.sum().item() == 0 and sums.sum().item() == 0.0
    assert all(p.grad is not None for p in model.parameters())  # every parameter still has a gradient


def test_lora_adapters_on_the_skipped_modules_get_the_same_gradients():
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj", "gate_proj"], init_lora_weights=False)
    whole = CausalLMWithMaskedLoss(_llama())
    whole.lm = get_peft_model(whole.lm, lora)
    skipping = copy.deepcopy(whole)
    assert skipping.last_layer.install(skipping.lm).modules == ["self_attn.o_proj", "mlp"]
    batch = _padded_batch()
    got, want = _loss_and_grads(skipping, batch), _loss_and_grads(whole, batch)
    assert any("lora" in name for name in want[2])
    _assert_same(got, want)


def test_with_the_fused_cpu_layers():
    lm = _llama()
    report = install_fused_layers(lm, "auto", on_cuda=False, dtype="fp32")
    if report.reason:
        pytest.skip(report.reason)
    use_segment_attention(lm)
    whole = CausalLMWithMaskedLoss(copy.deepcopy(lm))
    skipping = CausalLMWithMaskedLoss(lm)
    skipping.last_layer.install(skipping.lm)
    _assert_same(_loss_and_grads(skipping, _packed_batch()), _loss_and_grads(whole, _packed_batch()))


def test_qwen2_is_skipped_the_same_way():
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(**SIZES))
    whole = CausalLMWithMaskedLoss(copy.deepcopy(lm))
    skipping = CausalLMWithMaskedLoss(lm)
    assert skipping.last_layer.install(skipping.lm).modules == ["self_attn.o_proj", "mlp"]
    _assert_same(_loss_and_grads(skipping, _padded_batch()), _loss_and_grads(whole, _padded_batch()))


def test_gradient_checkpointing_is_left_alone():
    lm = _llama()
    lm.gradient_checkpointing_enable()
    rows = LastLayerRows().install(lm)
    assert rows.modules == [] and "gradient checkpointing" in rows.describe()


def test_a_mixture_of_experts_mlp_is_left_alone():
    lm = _llama()

    class Experts(torch.nn.Module):  # routes on every row: no gate/up/down projections
        def __init__(self):
            super().__init__()
            self.router = torch.nn.Linear(SIZES["hidden_size"], 2)

        def forward(self, x):
            return x * self.router(x).softmax(-1)[..., :1]

    last_decoder_layer(lm).mlp = Experts()
    rows = LastLayerRows().install(lm)
    assert rows.modules == [] and "Experts" in rows.describe() and "not a dense" in rows.describe()


def test_a_model_without_a_layers_list_is_left_alone():
    rows = LastLayerRows().install(torch.nn.Linear(3, 3))
    assert rows.modules == [] and "no self_attn.o_proj and mlp" in rows.describe()
    assert last_decoder_layer(torch.nn.Linear(3, 3)) is None

