"""Fused layers (engine/fused_layers.py): a fused Llama, Qwen2 or Qwen3 gives the eager model's loss
and gradients; every RMSNorm, MLP, the rotary embedding and the per-sample attention really run fused; inputs the kernels do
not take fall back; generation, PEFT, state_dict keys and the modes behave as documented."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from engine.config import ConfigError
from engine.fused_layers import FusedLayersError, install_fused_layers
from engine.kernels.cpu import extension, linear
from engine.loss import CausalLMWithMaskedLoss
from engine.segment_attention import use_segment_attention

pytestmark = pytest.mark.skipif(os.environ.get(extension.DISABLE_ENV, "1") == "0",
                                reason=f"{extension.DISABLE_ENV}=0")

SIZES = dict(vocab_size=101, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SIZES)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SIZES)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SIZES, head_dim=16)),
}


def _pair(kind: str):
    torch.manual_seed(0)
    eager = MODELS[kind]()
    fused = copy.deepcopy(eager)
    report = install_fused_layers(fused, "auto", on_cuda=False, dtype="fp32")
    return eager, fused, report


def _batch():
    g = torch.Generator().manual_seed(1)
    # 80 tokens: at least linear.MIN_ROWS, so the projections take the oneDNN products
    ids = torch.randint(3, SIZES["vocab_size"], (1, 80), generator=g)
    positions = torch.cat([torch.arange(30), torch.arange(50)]).unsqueeze(0)  # two packed samples
    labels = ids.clone()
    labels[0, :5] = -100
    labels[0, 30:40] = -100
    return ids, labels, positions


def _loss_and_grads(lm):
    use_segment_attention(lm)
    model = CausalLMWithMaskedLoss(lm)
    ids, labels, positions = _batch()
    sums, counts = model(input_ids=ids, labels=labels, position_ids=positions)
    loss = sums.sum() / counts.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fused_model_gives_the_eager_loss_and_gradients(kind):
    eager, fused, report = _pair(kind)
    norms = 2 * SIZES["num_hidden_layers"] + 1 + (2 * SIZES["num_hidden_layers"] if kind == "qwen3" else 0)
    assert (report.rms_norms, report.mlps, report.rotary, report.reason) == (norms, SIZES["num_hidden_layers"], True, None)
    assert report.attentions == SIZES["num_hidden_layers"]
    assert report.linears == (7 * SIZES["num_hidden_layers"] if linear.available() else 0)
    assert report.projections_reason == linear.unavailable_reason()
    want_loss, want = _loss_and_grads(eager)
    got_loss, got = _loss_and_grads(fused)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert fused.state_dict().keys() == eager.state_dict().keys()


def test_every_fused_kernel_runs(monkeypatch):
    """The fused path is really taken: count the C++ op calls of one forward and backward."""
    _, fused, _ = _pair("llama")
    ops = extension.load_body_ops()
    calls: dict[str, int] = {}

    class Counting:
        def __getattr__(self, name):
            def call(*args):
                calls[name] = calls.get(name, 0) + 1
                return getattr(ops, name)(*args)
            return call

    monkeypatch.setitem(extension._state, "ops", Counting())
    _loss_and_grads(fused)
    layers = SIZES["num_hidden_layers"]
    # 7 projections per layer (the forward product and both backward ones each), and the fused
    # loss's one chunk (logits and dW; dH stays on the default BLAS), where oneDNN serves float32
    want = {"rms_norm_forward": 2 * layers + 1, "rms_norm_backward": 2 * layers + 1,
            "silu_mul_forward": layers, "silu_mul_backward": layers, "rope_apply": 4 * layers,
            "segment_causal_forward": layers, "segment_causal_backward": layers,
            "vocab_major_cross_entropy_": 1}  # the fused loss's one chunk
    if linear.available():
        want["gemm_"] = 3 * 7 * layers + 2
    assert calls == want


def test_without_onednn_the_projections_stay_on_the_blas(monkeypatch):
    """A CPU that torch's oneDNN matmul does not serve in float32 (or a torch without oneDNN): the
    norms, gate and rotary stay fused, the projections and the loss's products take the BLAS, the
    report says why, and the loss and gradients are the eager model's."""
    monkeypatch.setattr(linear, "unavailable_reason", lambda: "this CPU lacks AVX-512")
    eager, fused, report = _pair("llama")
    assert report.linears == 0 and report.mlps == SIZES["num_hidden_layers"] and report.reason is None
    assert "projections on the default BLAS: this CPU lacks AVX-512" in report.describe()
    ops = extension.load_body_ops()
    calls: list[str] = []

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ops, name)

    monkeypatch.setitem(extension._state, "ops", Counting())
    want_loss, want = _loss_and_grads(eager)
    got_loss, got = _loss_and_grads(fused)
    assert "gemm_" not in calls and "silu_mul_forward" in calls
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_other_dtypes_fall_back_to_the_eager_modules():
    eager, fused, _ = _pair("llama")
    eager, fused = eager.double(), fused.double()
    ids, _, positions = _batch()
    with torch.no_grad():
        want = eager(input_ids=ids, position_ids=positions).logits
        got = fused(input_ids=ids, position_ids=positions).logits
    assert torch.equal(got, want)  # float64 takes the very same eager code


def test_generation_is_unchanged():
    eager, fused, _ = _pair("llama")
    prompt = torch.tensor([[5, 9, 12, 40]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(prompt, **kwargs), eager.generate(prompt, **kwargs))


def test_lora_adapters_on_fused_projections_still_train():
    from peft import LoraConfig, get_peft_model

    _, fused, _ = _pair("llama")
    peft_model = get_peft_model(fused, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "q_proj"]))
    ids, labels, positions = _batch()
    out = peft_model(input_ids=ids, labels=labels, position_ids=positions)
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_disabled_leaves_the_model_alone():
    torch.manual_seed(0)
    model = MODELS["llama"]()
    report = install_fused_layers(model, "disabled", on_cuda=False, dtype="fp32")
    assert report.reason == "model.fused_layers is disabled" and report.rms_norms == 0
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("on_cuda,dtype,why", [(True, "fp32", "CUDA"), (False, "bf16", "float32")])
def test_auto_explains_and_required_refuses(on_cuda, dtype, why):
    model = MODELS["llama"]()
    report = install_fused_layers(model, "auto", on_cuda=on_cuda, dtype=dtype)
    assert report.rms_norms == 0 and why in report.reason and why in report.describe()
    with pytest.raises(FusedLayersError, match="model.fused_layers is required") as raised:
        install_fused_layers(model, "required", on_cuda=on_cuda, dtype=dtype)
    assert isinstance(raised.value, ConfigError)


def test_unknown_model_types_are_left_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    report = install_fused_layers(model, "auto", on_cuda=False, dtype="fp32")
    assert "gpt2" in report.reason


def test_unavailable_kernels_are_reported(monkeypatch):
    monkeypatch.setitem(extension._state, "ops", None)
    monkeypatch.setitem(extension._state, "reason", "the C++ build failed: no compiler")
    report = install_fused_layers(MODELS["llama"](), "auto", on_cuda=False, dtype="fp32")
    assert "no compiler" in report.reason
    with pytest.raises(FusedLayersError, match="no compiler"):
        install_fused_layers(MODELS["llama"](), "required", on_cuda=False, dtype="fp32")


def test_bad_mode_names_the_key():
    with pytest.raises(FusedLayersError, match="model.fused_layers"):
        install_fused_layers(MODELS["llama"](), "on", on_cuda=False, dtype="fp32")
