"""LoRA through PEFT: adapters on the model's projections, their export, and loading an adapter as a model.

Turned on by `model.lora.r > 0`. The order of the parts is what makes it work with the fused loss
and with ZeRO:

  1. build_model loads the base (engine/model.py);
  2. CausalLMWithMaskedLoss puts the FusedLMHead in place of the lm_head (engine/fused_head.py);
  3. `apply_lora` wraps the model in a PeftModel: adapters on the target projections, the base
     frozen; a head named in modules_to_save is copied by PEFT around the FusedLMHead, so the loss
     still runs inside the module that owns the (now trainable) weight;
  4. deepspeed.initialize sees only the trainable parameters in the optimizer; ZeRO-3 partitions
     frozen and trainable parameters alike and gathers them in the forward hooks as always.

Exports: the adapter in PEFT's own format (adapter_config.json naming the base model directory,
adapter_model.safetensors, plus the tokenizer), which loads with `PeftModel.from_pretrained`; and,
on request, the merged HF model, built by PEFT's `merge_and_unload` from the gathered weights.
A `model.path` that holds an adapter loads as its base with the adapter merged, so a stage can
start from a LoRA stage's export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import torch

from engine.config import ConfigError, LoraConfig

ADAPTER_CONFIG = "adapter_config.json"

AUTO_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj",      # Llama, Qwen2/3, Mistral, GLM-4 attention
    "gate_proj", "up_proj", "down_proj", "gate_up_proj",     # their SwiGLU MLPs
    "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h",  # ChatGLM blocks
)
"""What `target_modules: auto` adapts: the attention and MLP projections of Llama/Qwen2/Qwen3/GLM-style
blocks, where present. Routers, embeddings and the lm_head are never picked automatically."""


def is_adapter_dir(path: str | Path) -> bool:
    return bool(path) and (Path(path) / ADAPTER_CONFIG).is_file()


def linear_leaf_names(model: torch.nn.Module) -> list[str]:
    """The last name part of every Linear inside the model's blocks (not the output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not head}
    return sorted(names)


def resolve_target_modules(model: torch.nn.Module, spec: str | list[str]) -> list[str]:
    """The module names to adapt: `auto` -> the known projections the model has; else as given,
    each of which must exist (a typo never trains nothing)."""
    present = linear_leaf_names(model)
    if spec == "auto":
        found = [name for name in AUTO_TARGETS if name in present]
        if not found:
            raise ConfigError(f"model.lora.target_modules: auto found none of {', '.join(AUTO_TARGETS)} in "
                              f"{type(model).__name__}; name the projections to adapt (its Linear layers: "
                              f"{', '.join(present) or 'none'})")
        return found
    named = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [name for name in spec if name not in named]
    if missing:
        raise ConfigError(f"model.lora.target_modules: {', '.join(missing)} not in {type(model).__name__} "
                          f"(its Linear layers: {', '.join(present)})")
    return list(spec)


def peft_config(cfg: LoraConfig, model: torch.nn.Module, base_path: str):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=resolve_target_modules(model, cfg.target_modules),
        modules_to_save=list(cfg.modules_to_save) or None,
        init_lora_weights=True if cfg.init == "default" else cfg.init,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_path or None,
    )


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, *, base_path: str, seed: int):
    """The model wrapped in a PeftModel with fresh adapters (seeded: every rank builds the same)."""
    from peft import get_peft_model

    base = str(Path(base_path).resolve()) if base_path else ""
    config = peft_config(cfg, model, base)
    if base:  # PEFT names the model's own name_or_path as the base: make it the absolute directory
        model.name_or_path = base
    if getattr(model, "is_activation_checkpointing", False):
        # Frozen embeddings give the checkpointed blocks inputs without grad; their adapters then
        # would get none. This makes the embedding output require grad, as PEFT's docs prescribe.
        model.enable_input_require_grads()
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; under ZeRO-3 from ds_numel (partitioned tensors report 0)."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def adapted_modules(peft_model) -> list[str]:
    """Names of the modules that carry an adapter or are trained whole (modules_to_save)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    prefix = "base_model.model."
    return [name[len(prefix):] if name.startswith(prefix) else name
            for name, module in peft_model.named_modules() if isinstance(module, (LoraLayer, ModulesToSaveWrapper))]


# ----------------------------------------------------------------------------------------------
# export


def _gathered(model, names: Optional[set[str]], dtype: torch.dtype) -> dict:
    """name -> full CPU tensor on rank 0 for the named parameters (all when names is None)."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    state = {}
    for name, param in model.named_parameters():
        if names is not None and name not in names:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.data.detach().to(dtype=dtype, device="cpu").clone()
    return state


def export_adapter(peft_model, tokenizer, out_dir: str | Path, dtype: torch.dtype) -> Optional[Path]:
    """Write the adapter in PEFT format (+ tokenizer) on rank 0; every rank must call this."""
    import torch.distributed as dist

    trained = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    state = _gathered(peft_model, trained, dtype)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        # save_pretrained picks the adapter's tensors out of the gathered ones itself
        peft_model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    if dist.is_initialized():
        dist.barrier()
    return out_dir if rank == 0 else None


def merged_model(base_config, peft_cfg, state: dict):
    """A plain HF model from a PeftModel's state (names as its named_parameters give them): a
    skeleton of the base with its parameters on the meta device, the weights assigned into it (no
    second copy), then PEFT's merge_and_unload."""
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary) real
        skeleton = AutoModelForCausalLM.from_config(base_config)
    skeleton = get_peft_model(skeleton, peft_cfg)
    _, unexpected = skeleton.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"merged export: unexpected weights {unexpected[:5]}")
    base = skeleton.get_base_model()
    head = base.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and head.weight.is_meta:
        head.weight = base.get_input_embeddings().weight  # tied: named once in the gathered state
    merged = skeleton.merge_and_unload()  # a head in modules_to_save replaces the tied one (untied)
    still_meta = [n for n, p in merged.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"merged export: no weight for {still_meta[:5]}")
    return merged


def export_merged(peft_model, tokenizer, out_dir: str | Path, dtype: torch.dtype) -> Optional[Path]:
    """Write the base with the adapter merged, as a HF model directory, on rank 0 (all ranks call)."""
    import torch.distributed as dist

    state = _gathered(peft_model, None, torch.float32)  # merge in fp32, cast after
    rank = dist.get_rank() if dist.is_initialized() else 0
    out_dir = Path(out_dir)
    if rank == 0:
        # The training model's head is a FusedLMHead; the skeleton's is a plain Linear with the
        # same parameter names, so the state loads as is.
        merged = merged_model(peft_model.get_base_model().config, peft_model.peft_config["default"], state)
        merged = merged.to(dtype)
        merged.config.use_cache = True
        merged.config.dtype = dtype
        generation = peft_model.get_base_model().generation_config
        generation.eos_token_id, generation.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        merged.generation_config = generation
        out_dir.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    if dist.is_initialized():
        dist.barrier()
    return out_dir if rank == 0 else None


# ----------------------------------------------------------------------------------------------
# an adapter directory as model.path


def adapter_base_path(adapter_dir: str | Path) -> Path:
    """The base model directory an adapter was trained on (its adapter_config.json names it)."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path") or ""
    if not base or not (Path(base) / "config.json").is_file() and not is_adapter_dir(base):
        raise ConfigError(f"model.path: {adapter_dir} holds an adapter whose base {base!r} (adapter_config.json "
                          "base_model_name_or_path) is not a local model directory")
    return Path(base)


def merge_adapter(base_model, adapter_dir: str | Path):
    """The base model with the adapter in adapter_dir loaded and merged into its weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()


def adapter_plan(skeleton: torch.nn.Module, cfg: LoraConfig) -> str:
    """What `--dry-run` shows: the modules that get adapters and the trainable share, computed on
    a skeleton whose parameters live on the meta device."""
    from peft import get_peft_model

    peft_model = get_peft_model(skeleton, peft_config(cfg, skeleton, ""))
    trainable, total = parameter_counts(peft_model)
    targets = peft_model.peft_config["default"].target_modules
    return (f"r={cfg.r} alpha={cfg.alpha:g} on {', '.join(sorted(targets))}: {len(adapted_modules(peft_model))} "
            f"modules ({describe(adapted_modules(peft_model), 2)}); {trainable:,} of {total:,} parameters "
            f"trainable ({trainable / max(total, 1):.2%})")


def describe(names: Iterable[str], limit: int = 4) -> str:
    names = list(names)
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return shown or "none"
