"""Attention within samples (engine/segment_attention.py): per-sample SDPA equals each sample run
alone; a padding-free tiny Llama gives the padded, masked model's loss and gradients; decoding and
the saved config are unchanged; eager cannot run padding-free."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from data_pipeline.schedule.collate import LoadedSample, collate_padding_free, collate_rows
from engine.config import ConfigError, RunConfig
from engine.loss import CausalLMWithMaskedLoss
from engine import segment_attention
from engine.segment_attention import SEGMENTS, sdpa_segments, segment_causal_attention, use_segment_attention

VOCAB = 97


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_segment_attention_equals_each_sample_alone(kv_heads):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, 10, 8, generator=g, dtype=torch.float64) for _ in range(2))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], list(range(10))])
    module = torch.nn.Module()
    module.num_key_value_groups = 4 // kv_heads
    out, _ = segment_causal_attention(module, q, k, v, None, scaling=0.3, position_ids=positions)
    k_all, v_all = k.repeat_interleave(4 // kv_heads, 1), v.repeat_interleave(4 // kv_heads, 1)
    for b, segments in ((0, [(0, 4), (4, 7), (7, 10)]), (1, [(0, 10)])):
        for s, e in segments:
            want = F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k_all[b:b + 1, :, s:e], v_all[b:b + 1, :, s:e],
                                                  is_causal=True, scale=0.3)
            torch.testing.assert_close(out[b:b + 1, s:e], want.transpose(1, 2))
    # and it differs from attending across samples: the check can fail
    full = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True, scale=0.3).transpose(1, 2)
    assert (out[0] - full[0]).abs().max() > 1e-3


def test_decoding_with_a_cache_is_plain_attention():
    """One query against many keys (a KV cache): attends to all of them, as sdpa does."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 1, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(2))
    module = torch.nn.Module()
    module.training = False
    out, _ = sdpa_segments(module, q, k, v, None, scaling=0.5, position_ids=torch.tensor([[5]]))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.5).transpose(1, 2))


def _tiny_llama(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).float()  # the fused loss takes fp32/bf16/fp16


def _samples(lengths: list[int]) -> list[LoadedSample]:
    rng = np.random.default_rng(3)
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(3, VOCAB, n)
        labels = ids.copy()
        labels[: n // 3] = -100  # a prompt that does not train
        out.append(LoadedSample(0, i, ids, labels))
    return out


def _loss_and_grads(model, batches) -> tuple[float, dict[str, torch.Tensor]]:
    wrapped = CausalLMWithMaskedLoss(model, num_sources=1)
    model.zero_grad()
    total = 0.0
    for mb in batches:
        out = wrapped(**mb.model_inputs())
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        total += float(loss)
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [False, True])
def test_padding_free_model_gives_the_masked_models_loss_and_gradients(packed, monkeypatch):
    samples = _samples([9, 23, 5, 17, 30, 12])
    rows = [samples[:3], samples[3:]] if packed else [[s] for s in samples]
    pad_to = max(sum(len(s.input_ids) for s in row) for row in rows)
    dense_model = _tiny_llama()
    want_loss, want_grads = _loss_and_grads(dense_model, [collate_rows(rows, pad_to, 0, "bool")])
    free_model = _tiny_llama()
    assert use_segment_attention(free_model) == SEGMENTS
    mb = collate_padding_free(rows, 0)
    assert mb.input_ids.shape == (1, sum(len(s.input_ids) for s in samples)) and mb.attention_mask is None
    got_loss, got_grads = _loss_and_grads(free_model, [mb])
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # with the sample boundaries ignored the row attends across samples: another loss (the check can fail)
    monkeypatch.setattr(segment_attention, "segment_bounds", lambda positions, n: [[0, n]] * len(positions))
    crossed, _ = _loss_and_grads(free_model, [mb])
    assert abs(crossed - want_loss) > 1e-5 * abs(want_loss), (crossed, want_loss)


def test_generation_and_the_saved_config_are_unchanged(tmp_path):
    prompt = torch.tensor([[5, 9, 11, 40, 2]])
    want = _tiny_llama().generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model = _tiny_llama()
    use_segment_attention(model)
    got = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    model.save_pretrained(tmp_path)
    assert SEGMENTS not in (tmp_path / "config.json").read_text()


def test_other_implementations_keep_their_own_kernel():
    assert use_segment_attention(_tiny_llama("eager")) == "eager"


def test_eager_cannot_run_padding_free():
    cfg = RunConfig()
    cfg.model.attn_implementation = "eager"
    with pytest.raises(ConfigError, match="data.padding_free"):
        cfg.validate()
    cfg.data.padding_free = False
    try:
        cfg.validate()
    except ConfigError as e:  # other keys of the default config may be incomplete; not this one
        assert "padding_free" not in str(e)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cuda_varlen_kernel_equals_the_per_sample_loop(kv_heads):
    if segment_attention.varlen_kernel() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 4, 96, 64)
    q = torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 96, 64, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    positions = torch.cat([torch.arange(40), torch.arange(50), torch.arange(6)]).repeat(2, 1).cuda()
    module = torch.nn.Module()
    module.num_key_value_groups = 4 // kv_heads
    got, _ = segment_causal_attention(module, q, k, v, None, scaling=0.125, position_ids=positions)
    grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    reference = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    want, _ = segment_causal_attention(module, *reference, None, scaling=0.125, position_ids=positions.cpu())
    want_grads = torch.autograd.grad(want.square().sum(), reference)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-2, atol=2e-2)
    for g_got, g_want in zip(grads, want_grads):
        torch.testing.assert_close(g_got.double().cpu(), g_want, rtol=5e-2, atol=5e-2)
