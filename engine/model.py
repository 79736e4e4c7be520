"""The causal LM: a local pretrained HF directory, or a small Llama-style model built from scratch."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import ConfigError, ModelConfig
from engine.lora import adapter_base_path, is_adapter_dir, merge_adapter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}



def build_model(cfg: ModelConfig, tokenizer, *, seed: int):
    """Load `cfg.path`, or build the from-scratch architecture sized to the tokenizer.

    Weights stay fp32 here: DeepSpeed casts them for bf16/fp16 training and keeps fp32 masters.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if cfg.path:
        model = load_pretrained(Path(cfg.path), cfg)
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    else:
        hf_config = scratch_config(cfg, len(tokenizer), tokenizer)
        hf_config._attn_implementation = cfg.attn_implementation
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.config.use_cache = False  # no KV cache while training
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def scratch_config(cfg: ModelConfig, vocab_size: int, tokenizer=None):
    """The from-scratch Llama architecture of model.from_scratch, sized to the vocabulary."""
    from transformers import LlamaConfig

    a = cfg.from_scratch
    if a.hidden_size % a.num_attention_heads or a.num_attention_heads % a.num_key_value_heads:
        raise ConfigError("model.from_scratch: hidden_size must divide by num_attention_heads, "
                          "and num_attention_heads by num_key_value_heads")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads,
        max_position_embeddings=a.max_position_embeddings,
        rope_theta=a.rope_theta,
        tie_word_embeddings=a.tie_word_embeddings,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
    )


def model_skeleton(cfg: ModelConfig, vocab_size: int):
    """The model's modules with their parameters on the meta device (no weights read): for plans."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.path:
        path = Path(cfg.path)
        while is_adapter_dir(path):
            path = adapter_base_path(path)
        hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    else:
        hf_config = scratch_config(cfg, vocab_size)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.trust_remote_code)
    skeleton.tie_weights()  # tied embeddings are one parameter, as in the loaded model
    return skeleton


def load_pretrained(path: Path, cfg: ModelConfig):
    """A HF model directory, or an adapter directory (LoRA export): its base with the adapter merged."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if is_adapter_dir(path):
        return merge_adapter(load_pretrained(adapter_base_path(path), cfg), path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: {path} is not a HF model directory (no config.json)")
    hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    extra = {}
    if cfg.lora.enabled and cfg.lora.quantize == "4bit":
        extra = {"quantization_config": qlora_quantization(), "device_map": {"": torch.cuda.current_device()}}
    return AutoModelForCausalLM.from_pretrained(
        str(path),
        config=hf_config,
        dtype=torch.float32 if not extra else torch.bfloat16,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        **extra,
    )


def qlora_quantization():
    """QLoRA's 4-bit NF4 base (bitsandbytes, CUDA only; preflight refuses it elsewhere)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def count_parameters(model) -> int:
    # Under ZeRO-3 parameters are partitioned and report numel 0; ds_numel is the full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
