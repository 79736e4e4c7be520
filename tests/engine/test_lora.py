"""LoRA in one process: the config keys, which modules get adapters, the merged model, adapter
directories as model.path, and the plan --dry-run shows (engine/lora.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, LoraConfig, ModelConfig, load_config
from engine.lora import (adapted_modules, adapter_base_path, adapter_plan, apply_lora, merged_model,
                         parameter_counts, resolve_target_modules)
from engine.model import build_model, model_skeleton
from engine.preflight import check_lora, check_model_dir
from tests.engine import grad_probe

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "configs" / "sft" / "demo.yaml"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_r_above_zero_turns_lora_on_with_auto_targets():
    cfg = load_config(DEMO, ["model.lora.r=8"])
    assert cfg.model.lora.enabled and cfg.model.lora.target_modules == "auto"
    assert not load_config(DEMO).model.lora.enabled
    listed = load_config(DEMO, ["model.lora.r=8", "model.lora.target_modules=[q_proj,v_proj]"])
    assert listed.model.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("override,key", [
    ("model.lora.r=-1", "model.lora.r"),
    ("model.lora.dropout=1.0", "model.lora.dropout"),
    ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.lora.target_modules=q_proj", "model.lora.target_modules"),
    ("model.lora.target_modules=[auto,q_proj]", "model.lora.target_modules"),
    ("model.lora.init=pissa", "model.lora.init"),
    ("model.lora.quantize=8bit", "model.lora.quantize"),
])
def test_bad_lora_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DEMO, ["model.lora.r=8", override])


def test_qlora_needs_cuda():
    cfg = load_config(DEMO, ["model.lora.r=8", "model.lora.quantize=4bit"])
    with pytest.raises(ConfigError, match="model.lora.quantize: 4bit .* needs CUDA"):
        check_lora(cfg, on_cuda=False)
    check_lora(load_config(DEMO, ["model.lora.r=8"]), on_cuda=False)


def test_auto_targets_are_the_block_projections_and_never_the_head():
    model = grad_probe.tiny_model()
    assert resolve_target_modules(model, "auto") == PROJECTIONS
    assert resolve_target_modules(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="model.lora.target_modules: qproj not in LlamaForCausalLM"):
        resolve_target_modules(model, ["qproj"])


def test_auto_without_known_projections_names_the_linear_layers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.get_output_embeddings = lambda: None
    with pytest.raises(ConfigError, match=r"auto found none .* \(its Linear layers: 0\)"):
        resolve_target_modules(model, "auto")


def test_only_adapters_train_and_the_counts_say_so():
    model = apply_lora(grad_probe.tiny_model(), LoraConfig(r=4), base_path="", seed=0)
    trainable, total = parameter_counts(model)
    adapters = sum(4 * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if name.endswith(tuple(PROJECTIONS)))  # r * (in + out) for each adapted Linear
    assert trainable == adapters and 0 < trainable < total
    assert len(adapted_modules(model)) == 2 * len(PROJECTIONS)  # two blocks
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def _perturbed(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=g))
    return model


@pytest.mark.parametrize("save", [[], ["lm_head"], ["lm_head", "embed_tokens"]])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_merged_model_gives_the_adapted_models_logits(save, tie):
    peft_model = _perturbed(apply_lora(grad_probe.tiny_model(tie=tie), LoraConfig(r=4, modules_to_save=save),
                                       base_path="", seed=0))
    state = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    merged = merged_model(peft_model.get_base_model().config, peft_model.peft_config["default"], state)
    assert not any(p.is_meta for p in merged.parameters())
    ids = torch.randint(3, grad_probe.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (want - peft_model.get_base_model().__class__(peft_model.get_base_model().config)(input_ids=ids)
            .logits).abs().max() > 1e-3  # the adapter changes the model: the comparison means something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Vocabulary:
    """All build_model asks of a tokenizer when the model has a path: its size."""

    def __len__(self) -> int:
        return grad_probe.VOCAB


def test_an_adapter_directory_loads_as_its_base_with_the_adapter_merged(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = grad_probe.tiny_model()
    base.save_pretrained(base_dir)
    peft_model = _perturbed(apply_lora(grad_probe.tiny_model(), LoraConfig(r=4), base_path=str(base_dir), seed=0))
    peft_model.save_pretrained(adapter_dir)
    assert adapter_base_path(adapter_dir) == base_dir.resolve()
    cfg = ModelConfig(path=str(adapter_dir), attn_implementation="eager")
    loaded = build_model(cfg, _Vocabulary(), seed=0)
    ids = torch.randint(3, grad_probe.VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_an_adapter_whose_base_is_gone_names_the_key(tmp_path):
    adapter_dir = tmp_path / "adapter"
    apply_lora(grad_probe.tiny_model(), LoraConfig(r=4), base_path=str(tmp_path / "gone"), seed=0) \
        .save_pretrained(adapter_dir)
    cfg = load_config(DEMO, [f"model.path={adapter_dir}"])
    with pytest.raises(ConfigError, match="model.path: .* holds an adapter whose base .*gone"):
        check_model_dir(cfg)


def test_dry_run_plan_names_the_adapted_modules_on_a_skeleton():
    cfg = load_config(DEMO, ["model.lora.r=8", "model.lora.target_modules=[q_proj,v_proj]"])
    skeleton = model_skeleton(cfg.model, 512)
    assert all(p.is_meta for p in skeleton.parameters())
    plan = adapter_plan(skeleton, cfg.model.lora)
    layers = cfg.model.from_scratch.num_hidden_layers
    assert plan.startswith(f"r=8 alpha=16 on q_proj, v_proj: {2 * layers} modules (model.layers.0.self_attn.q_proj")
    hidden = cfg.model.from_scratch.hidden_size
    assert f"{2 * layers * 8 * (hidden + hidden):,} of" in plan
