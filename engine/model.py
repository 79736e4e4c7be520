"""The causal LM: a local pretrained HF directory, or a small Llama-style model built from scratch."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import ConfigError, ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(cfg: ModelConfig, tokenizer, *, seed: int):
    """Load `cfg.path`, or build the from-scratch architecture sized to the tokenizer.

    Weights stay fp32 here: DeepSpeed casts them for bf16/fp16 training and keeps fp32 masters.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    if cfg.path:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path: {path} is not a HF model directory (no config.json)")
        hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            config=hf_config,
            dtype=torch.float32,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
        )
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    else:
        a = cfg.from_scratch
        if a.hidden_size % a.num_attention_heads or a.num_attention_heads % a.num_key_value_heads:
            raise ConfigError("model.from_scratch: hidden_size must divide by num_attention_heads, "
                              "and num_attention_heads by num_key_value_heads")
        hf_config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=a.hidden_size,
            intermediate_size=a.intermediate_size,
            num_hidden_layers=a.num_hidden_layers,
            num_attention_heads=a.num_attention_heads,
            num_key_value_heads=a.num_key_value_heads,
            max_position_embeddings=a.max_position_embeddings,
            rope_theta=a.rope_theta,
            tie_word_embeddings=a.tie_word_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        hf_config._attn_implementation = cfg.attn_implementation
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.config.use_cache = False  # no KV cache while training
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def count_parameters(model) -> int:
    # Under ZeRO-3 parameters are partitioned and report numel 0; ds_numel is the full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
