"""Checks of a run's inputs that need no data preparation and no model: made first, in the real
run as in `--dry-run`, so that a wrong path or an impossible setting fails in seconds with a
message naming the config key, not after minutes of tokenization or with a traceback.

Each check raises ConfigError naming the key. The real run calls `check_before_data`, which stops
at the first problem; the dry run (engine/dry_run.py) calls the checks one by one and reports all.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional, Sequence

from data_pipeline.render.tokenizer import TokenizerError, load_tokenizer
from engine.checkpointing.checkpoint import resume_checkpoint
from engine.config import ConfigError, RunConfig, Stage
from engine.ds_config import build_ds_config
from engine.lora import adapter_base_path, is_adapter_dir
from engine.nan_policy import check_nan_policy_config
from engine.sequence_parallel import SequenceParallelLayout, check_heads

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
"""Where HF model configs keep the longest sequence the model is built for, by model family."""


def tokenizer_dir(cfg: RunConfig) -> Optional[tuple[str, Path]]:
    """(config key, directory) of the tokenizer the run loads; None when it trains its own."""
    if cfg.tokenizer.path:
        return "tokenizer.path", Path(cfg.tokenizer.path)
    if cfg.model.path:
        return "model.path", Path(cfg.model.path)
    return None


def check_tokenizer_dir(cfg: RunConfig) -> None:
    found = tokenizer_dir(cfg)
    if found is not None and not found[1].is_dir():
        key, path = found
        raise ConfigError(f"{key}: tokenizer directory {path} does not exist")


def load_run_tokenizer(cfg: RunConfig):
    """The tokenizer named by tokenizer.path or model.path (None when the run trains one)."""
    check_tokenizer_dir(cfg)
    found = tokenizer_dir(cfg)
    if found is None:
        return None
    key, path = found
    try:
        return load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    except TokenizerError as e:
        raise ConfigError(f"{key}: {e}") from None


def check_model_dir(cfg: RunConfig) -> None:
    if cfg.model.path and is_adapter_dir(cfg.model.path):
        adapter_base_path(cfg.model.path)  # a ConfigError when the base it names is not here
    elif cfg.model.path and not (Path(cfg.model.path) / "config.json").is_file():
        what = "does not exist" if not Path(cfg.model.path).exists() else "is not a HF model directory (no config.json)"
        raise ConfigError(f"model.path: {cfg.model.path} {what}")


def check_lora(cfg: RunConfig, *, on_cuda: bool) -> None:
    """LoRA settings that need a device or a library this machine may lack."""
    lora = cfg.model.lora
    if not lora.enabled or lora.quantize == "none":
        return
    if not on_cuda:
        raise ConfigError("model.lora.quantize: 4bit (QLoRA) needs CUDA (bitsandbytes' 4-bit kernels); "
                          "use model.lora.quantize=none on this machine")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.lora.quantize: 4bit needs bitsandbytes: pip install bitsandbytes")
    if not cfg.model.path:
        raise ConfigError("model.lora.quantize: 4bit quantizes a pretrained base; set model.path")


def _hf_config(cfg: RunConfig) -> tuple[dict, Path]:
    """The model's config.json (an adapter's base's, for an adapter directory) and its path."""
    model_dir = Path(cfg.model.path)
    while is_adapter_dir(model_dir):
        model_dir = adapter_base_path(model_dir)
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"model.path: cannot read {path}: {e}") from None


def model_max_positions(cfg: RunConfig) -> Optional[tuple[int, str]]:
    """(longest sequence the model is built for, where that figure comes from), if known."""
    if not cfg.model.path:
        return cfg.model.from_scratch.max_position_embeddings, "model.from_scratch.max_position_embeddings"
    hf_config, path = _hf_config(cfg)
    for section in (hf_config, hf_config.get("text_config") or {}):
        for key in POSITION_KEYS:
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, f"{key} in {path}"
    return None


def check_seq_len(cfg: RunConfig) -> Optional[str]:
    """Refuse a data.seq_len beyond the model's positions; returns what was compared, if anything."""
    found = model_max_positions(cfg)
    if found is None:
        return None
    limit, where = found
    if cfg.data.seq_len > limit:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_position_embeddings={limit} "
                          f"({where}); lower data.seq_len to at most {limit}")
    return f"{cfg.data.seq_len} <= {limit} ({where})"


def check_sequence_parallel(cfg: RunConfig, world_size: int) -> Optional[str]:
    """train.sequence_parallel against the world size and the model's attention heads."""
    sp = cfg.train.sequence_parallel
    if sp == 1:
        return None
    SequenceParallelLayout.of(0, world_size, sp)
    if cfg.model.path:
        hf_config, path = _hf_config(cfg)
        section = hf_config.get("text_config") or hf_config
        heads = section.get("num_attention_heads")
        kv_heads = section.get("num_key_value_heads") or heads
        where = str(path)
    else:
        heads = cfg.model.from_scratch.num_attention_heads
        kv_heads = cfg.model.from_scratch.num_key_value_heads
        where = "model.from_scratch"
    if isinstance(heads, int) and isinstance(kv_heads, int):
        check_heads(sp, heads, kv_heads, where)
    return (f"{sp} ranks share each sequence ({cfg.data.seq_len // sp} of data.seq_len={cfg.data.seq_len} "
            f"tokens each, {heads} heads -> {heads // sp if isinstance(heads, int) else '?'} per rank in attention); "
            f"data-parallel size {world_size // sp}")


def check_before_data(cfg: RunConfig, world_size: int, *, on_cuda: bool, base_dir: Path) -> dict:
    """The real run's first checks, before any data or model work; returns the DeepSpeed config."""
    ds_config = build_ds_config(cfg, world_size, on_cuda=on_cuda, base_dir=base_dir)
    check_nan_policy_config(cfg.train.nan_policy, ds_config, cfg.model.dtype)
    resume_checkpoint(cfg.checkpoint.resume, Path(cfg.run_dir) / "checkpoints")
    check_model_dir(cfg)
    check_lora(cfg, on_cuda=on_cuda)
    check_sequence_parallel(cfg, world_size)
    check_tokenizer_dir(cfg)
    check_seq_len(cfg)
    return ds_config


def check_stages_before_data(stages: Sequence[Stage], world_size: int, *, on_cuda: bool, base_dir: Path) -> None:
    """Every stage's checks before the first stage starts: a mistake in the last stage's DeepSpeed
    config must not surface only after the earlier stages have trained. A stage that starts from
    the previous stage's export (not written yet) has its model checks made when it starts."""
    for stage in stages:
        try:
            ds_config = build_ds_config(stage.cfg, world_size, on_cuda=on_cuda, base_dir=base_dir)
            check_nan_policy_config(stage.cfg.train.nan_policy, ds_config, stage.cfg.model.dtype)
            resume_checkpoint(stage.cfg.checkpoint.resume, stage.run_dir / "checkpoints")
            from_export = stage.index > 0 and stage.cfg.model.path == str(stages[stage.index - 1].export_dir)
            if not from_export:
                check_model_dir(stage.cfg)
                check_lora(stage.cfg, on_cuda=on_cuda)
                check_sequence_parallel(stage.cfg, world_size)
                check_tokenizer_dir(stage.cfg)
                check_seq_len(stage.cfg)
        except ConfigError as e:
            raise ConfigError(f"stages[{stage.index}] ({stage.name!r}): {e}") from None
