"""The run config: typed dataclasses loaded from YAML, with `key.sub=value` command-line overrides.

One YAML file describes a run. Every field is documented by the string literal under it; those
strings are what `launcher/run.py --help-config` prints. Unknown keys are an error that names the
key and suggests the nearest valid one, so a typo never silently falls back to a default. This
module holds the sections and their checks; engine/config_tree.py the mapping <-> dataclass
machinery (strict building, overrides, field docs) they are built with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from data_pipeline.spec import DataConfig, DataConfigError, SourceSpec
from engine.config_tree import (ConfigError, build_dataclass, dataclass_help, field_docs, parse_override, read_tree,
                                to_dict)
from engine.stage_plan import plan_stages


@dataclass
class FromScratchConfig:
    """A small Llama-style architecture, for models trained from scratch."""

    hidden_size: int = 256
    """Width of the residual stream."""
    num_hidden_layers: int = 4
    """Number of transformer blocks."""
    num_attention_heads: int = 4
    """Attention heads."""
    num_key_value_heads: int = 4
    """Key/value heads (fewer than attention heads = grouped-query attention)."""
    intermediate_size: int = 688
    """Width of the SwiGLU MLP."""
    max_position_embeddings: int = 2048
    """Longest sequence the rotary embedding is set up for."""
    tie_word_embeddings: bool = True
    """Share the input embedding and the lm_head weight (common for small models)."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""


@dataclass
class LoraConfig:
    """Parameter-efficient training with LoRA adapters (through PEFT; engine/lora.py)."""

    r: int = 0
    """Adapter rank; 0 = off (full-parameter training). `model.lora.r=8` turns LoRA on."""
    alpha: float = 16.0
    """Scaling numerator: the adapter's update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: Union[str, list[str]] = "auto"
    """Modules that get adapters, by name (e.g. [q_proj, v_proj]); auto = the attention and MLP
    projections of Llama/Qwen2/Qwen3/GLM-style blocks. A name the model lacks is an error."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained whole beside the adapters and saved with them (e.g. [lm_head, embed_tokens])."""
    init: str = "default"
    """Adapter initialisation: default (A Kaiming-uniform, B zero: the model starts unchanged) or gaussian."""
    quantize: str = "none"
    """Base weights: none, or 4bit (QLoRA through bitsandbytes; needs CUDA)."""

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass
class ModelConfig:
    """Which causal LM to train."""

    path: str = ""
    """Local directory of a pretrained HF model (config.json + weights). Empty = from scratch."""
    from_scratch: FromScratchConfig = field(default_factory=FromScratchConfig)
    """Architecture used when `path` is empty."""
    dtype: str = "fp32"
    """Training precision: fp32, bf16 or fp16 (bf16/fp16 enable DeepSpeed mixed precision)."""
    trust_remote_code: bool = False
    """Allow custom modelling code shipped with the model directory. Off unless you trust it."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa, eager, or flash_attention_2 (GPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    fused_layers: str = "auto"
    """auto, required or disabled: RMSNorm, the SwiGLU gate and rotary embedding as one fused
    kernel each (Llama, Mistral, Qwen2, Qwen3). auto: the C++ CPU kernels for float32 runs on CPU
    (built on first use, cached), the model as it is elsewhere; required: an error where they
    cannot be used."""
    last_layer_target_rows: bool = True
    """The last decoder layer's output projection and MLP run on rows with a target only: what
    they compute for prompt and padding rows never reaches the loss, so the loss and every gradient
    are unchanged (engine/last_layer_rows.py). false: every row, as the model's own forward."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters instead of full-parameter training (on when lora.r > 0)."""


@dataclass
class TokenizerConfig:
    """Where the tokenizer comes from."""

    path: str = ""
    """Tokenizer directory. Empty: the model's own (model.path), or, from scratch, train one."""
    vocab_size: int = 2000
    """Vocabulary size when a byte-level BPE tokenizer is trained on the run's own text."""
    cjk_char_level: bool = False
    """When training a tokenizer: every Chinese character becomes one token (no merges across
    characters). Small models learn character-level tasks much faster this way."""


@dataclass
class TrainConfig:
    """Optimisation and batch geometry."""

    kind: str = "sft"
    """What this stage is: sft (response tokens only, small lr) or cpt (continued pretraining)."""
    micro_batch_size: int = 4
    """Sequences per rank per forward/backward."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all ranks = micro * grad_accum * world size."""
    max_steps: int = 100
    """Optimizer steps in the run."""
    lr: float = 2e-5
    """Peak learning rate. SFT usually wants ~10% of the pretraining lr."""
    pretrain_lr: Optional[float] = None
    """The lr the base model was pretrained with, if known; used to check `lr` for SFT."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: Optional[int] = None
    """Linear warmup steps. Default: 3% of max_steps for sft, 1% for cpt (at least 1)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    seed: int = 42
    """Seed for model init and dropout."""
    deepspeed: str = "configs/ds/zero2.json"
    """DeepSpeed config template; its "auto" fields are filled from this config."""
    use_deepspeed_optimizer: bool = False
    """Train with the optimizer block of the DeepSpeed config instead of the run's AdamW. Off: a block
    other than AdamW (whose lr, betas and weight decay come from this config) is an error, not a
    silent swap."""
    use_deepspeed_scheduler: bool = False
    """Train with the scheduler block of the DeepSpeed config instead of the run's warmup + cosine.
    Off: a scheduler block in the DeepSpeed config is an error, not a silent swap."""
    optimizer_impl: str = "auto"
    """AdamW implementation: auto (fused on GPU, torch on CPU), torch, fused, or cpu_adam."""
    loss_backend: str = "auto"
    """Masked linear cross-entropy backend: auto (Triton on CUDA, torch elsewhere), torch, triton."""
    loss_strategy: str = "row_chunks"
    """Fused loss algorithm: row_chunks (three products, an fp32 [vocab, hidden] gradient
    accumulator) or vocab_blocks (four products, the lm_head gradient written once in the model
    dtype: the least memory, for large vocabularies under tight memory)."""
    nan_policy: str = "stop"
    """On a non-finite loss or gradient norm: stop (error naming the step and per-source losses) or
    skip (drop that update on every rank; needs ZeRO >= 1 or bf16/fp16; see engine/nan_policy.py)."""
    sequence_parallel: int = 1
    """Ranks that share each sequence (DeepSpeed Ulysses; engine/sequence_parallel.py): each holds
    1/N of every row, so one sample may be N times longer than one device holds. Must divide the
    world size, the attention heads and data.seq_len; the data-parallel size is world / N."""
    tiled_mlp: int = 0
    """Run each block's MLP over the sequence in N tiles, recomputed in backward (DeepSpeed's TiledMLP;
    engine/tiled_mlp.py): for long samples, whose MLP activations dominate memory. 0 = off."""
    offload_activations: bool = False
    """Keep the activations saved for backward in host memory (torch's save_on_cpu) instead of on the
    device: for long samples on GPUs. Without a GPU they already are in host memory (no effect)."""
    stop_at_step: Optional[int] = None
    """End this job after this step (with a checkpoint) without changing the lr schedule, which
    still runs to max_steps; the next launch resumes. For jobs shorter than the whole run."""


@dataclass
class CheckpointConfig:
    """When and how checkpoints are written."""

    every_steps: int = 0
    """Save every N steps (0 = only at the end)."""
    every_minutes: float = 0.0
    """Also save when this many minutes passed since the last save (0 = off). Rank 0's clock
    decides for all ranks."""
    keep_last: int = 2
    """Keep the newest K checkpoints; older ones are deleted after a newer one is complete."""
    keep_best: int = 0
    """Also keep the M checkpoints with the lowest eval loss (0 = off); <run_dir>/checkpoints/best
    names the best one."""
    resume: str = "auto"
    """auto (continue from the newest complete checkpoint in run_dir), none, or a checkpoint dir."""
    export_at_end: bool = True
    """Export the final model to <run_dir>/export as a HF directory."""
    export_dtype: str = "auto"
    """dtype of the exported weights: auto (the training dtype), fp32, bf16 or fp16."""
    export_merged: bool = False
    """With LoRA: also export the base with the adapter merged, as a HF model, to <run_dir>/export_merged
    (<run_dir>/export holds the adapter in PEFT format)."""


@dataclass
class LogConfig:
    """What is logged, where and how often."""

    every_steps: int = 1
    """Write scalars every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under <run_dir>/tb."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts answered greedily before and after training (and every sample_every steps)."""
    sample_every: int = 0
    """Generate answers for sample_prompts every N steps into TensorBoard text (0 = only ends)."""
    sample_expected: list[str] = field(default_factory=list)
    """Optional exact answers to sample_prompts: the before/after report then counts exact hits."""
    sample_max_new_tokens: int = 48
    """Length limit of generated sample answers."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device for MFU; 0 = detect (known GPUs) or skip MFU."""
    deepspeed_log_level: str = "warning"
    """Level of DeepSpeed's own logger on every rank: debug, info, warning, error. Warnings and
    errors always show; info prints DeepSpeed's configuration dumps."""


@dataclass
class EvalConfig:
    """Evaluation on held-out data (data.sources[i].eval_fraction / eval_count) and data.eval_sources."""

    every_steps: int = 0
    """Evaluate every N optimizer steps (0 = only at the end)."""
    at_end: bool = True
    """Evaluate after the last step."""
    micro_batch_size: int = 0
    """Sequences per rank per eval forward; 0 = train.micro_batch_size."""


@dataclass
class RunConfig:
    """A whole run: model, tokenizer, data, training, checkpoints and logging."""

    run_dir: str = "runs/default"
    """Everything the run writes goes here: tokenized data, checkpoints, TensorBoard, export."""
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stages: list[dict] = field(default_factory=list)
    """Training stages run one after another, each a partial config applied on top of this one
    (a `name` plus any sections, e.g. {name: sft, train: {kind: sft, lr: 1e-5}, data: {...}}),
    into <run_dir>/<name>/, each starting from the previous stage's export (engine/stages.py)."""
    world_size: Optional[int] = None
    """Expected number of ranks; when set, a launch with another world size fails fast."""
    dist_timeout_minutes: float = 30.0
    """Timeout of collective operations."""

    def validate(self) -> None:
        _one_of("model.dtype", self.model.dtype, ("fp32", "bf16", "fp16"))
        _one_of("train.kind", self.train.kind, ("sft", "cpt"))
        _one_of("train.optimizer_impl", self.train.optimizer_impl, ("auto", "torch", "fused", "cpu_adam"))
        _one_of("train.loss_backend", self.train.loss_backend, ("auto", "torch", "triton"))
        _one_of("train.loss_strategy", self.train.loss_strategy, ("row_chunks", "vocab_blocks"))
        _one_of("train.nan_policy", self.train.nan_policy, ("stop", "skip"))
        if self.train.stop_at_step is not None and not 1 <= self.train.stop_at_step <= self.train.max_steps:
            raise ConfigError(f"train.stop_at_step: must be in [1, train.max_steps], got {self.train.stop_at_step}")
        _one_of("checkpoint.export_dtype", self.checkpoint.export_dtype, ("auto", "fp32", "bf16", "fp16"))
        for key in ("train.micro_batch_size", "train.global_batch_size", "train.max_steps"):
            if _get(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {_get(self, key)}")
        if not self.train.lr > 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.train.lr}")
        if self.train.warmup_steps is not None and not 0 <= self.train.warmup_steps <= self.train.max_steps:
            raise ConfigError(f"train.warmup_steps: must be in [0, train.max_steps], got {self.train.warmup_steps}")
        if self.log.sample_expected and len(self.log.sample_expected) != len(self.log.sample_prompts):
            raise ConfigError(f"log.sample_expected: {len(self.log.sample_expected)} answers for "
                              f"{len(self.log.sample_prompts)} log.sample_prompts")
        if self.checkpoint.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last: must be >= 1, got {self.checkpoint.keep_last}")
        for key in ("checkpoint.keep_best", "checkpoint.every_steps", "checkpoint.every_minutes"):
            if _get(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {_get(self, key)}")
        _one_of("model.fused_layers", self.model.fused_layers, ("auto", "required", "disabled"))
        _one_of("log.deepspeed_log_level", self.log.deepspeed_log_level, ("debug", "info", "warning", "error"))
        for key in ("eval.every_steps", "eval.micro_batch_size"):
            if _get(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {_get(self, key)}")
        self._validate_lora()
        if self.train.tiled_mlp < 0:
            raise ConfigError(f"train.tiled_mlp: must be >= 0 (0 = off), got {self.train.tiled_mlp}")
        sp = self.train.sequence_parallel
        if sp < 1:
            raise ConfigError(f"train.sequence_parallel: must be >= 1, got {sp}")
        if sp > 1 and self.data.seq_len % sp:
            raise ConfigError(f"train.sequence_parallel={sp} must divide data.seq_len={self.data.seq_len} "
                              "(every row is cut into equal parts)")
        if sp > 1 and self.model.attn_implementation == "eager":
            raise ConfigError("model.attn_implementation: eager builds a dense [L, L] mask; sequence parallelism "
                              "(train.sequence_parallel > 1) needs sdpa or flash_attention_2")
        if self.data.padding_free and self.model.attn_implementation == "eager":
            raise ConfigError("data.padding_free: eager attention adds a dense [L, L] mask to the scores and cannot "
                              "keep samples apart without it; set data.padding_free: false, or "
                              "model.attn_implementation: sdpa")
        if not self.model.path and self.tokenizer.vocab_size < 300:
            raise ConfigError("tokenizer.vocab_size: a byte-level BPE needs >= 300 (256 bytes + specials)")
        if self.stages:
            # The base is a template for its stages (it may leave data.sources to them): every
            # stage, merged, must validate instead.
            expand_stages(self)
            return
        try:
            self.data.validate("data")
        except DataConfigError as e:
            raise ConfigError(str(e)) from None

    def _validate_lora(self) -> None:
        lora = self.model.lora
        if lora.r < 0:
            raise ConfigError(f"model.lora.r: must be >= 0 (0 = off), got {lora.r}")
        if not lora.enabled:
            return
        if not lora.alpha > 0:
            raise ConfigError(f"model.lora.alpha: must be > 0, got {lora.alpha}")
        if not 0 <= lora.dropout < 1:
            raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {lora.dropout}")
        targets = lora.target_modules
        if targets != "auto" and (isinstance(targets, str) or not targets or "auto" in targets):
            raise ConfigError(f"model.lora.target_modules: auto or a list of module names, got {targets!r}")
        _one_of("model.lora.init", lora.init, ("default", "gaussian"))
        _one_of("model.lora.quantize", lora.quantize, ("none", "4bit"))

    @property
    def warmup_steps(self) -> int:
        if self.train.warmup_steps is not None:
            return self.train.warmup_steps
        share = 0.03 if self.train.kind == "sft" else 0.01
        return max(1, round(share * self.train.max_steps))


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def load_config(path: Optional[str | Path], overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `key.sub=value` overrides, build and validate it."""
    return build_config(read_tree(path, overrides))


def build_config(tree: dict) -> RunConfig:
    """A validated RunConfig from a plain mapping (as `to_dict` gives, or a merged stage tree)."""
    cfg = build_dataclass(RunConfig, tree, "")
    cfg.validate()
    return cfg


@dataclass(frozen=True)
class Stage:
    """One stage of a staged run (engine/stages.py): its name, its full config, the defaults filled in."""

    index: int
    name: str
    cfg: RunConfig
    notes: tuple[str, ...]

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def export_dir(self) -> Path:
        return self.run_dir / "export"


def expand_stages(cfg: RunConfig) -> list[Stage]:
    """The base config's stages as full, validated configs (a ConfigError names stages[i].key)."""
    stages: list[Stage] = []
    for planned in plan_stages(to_dict(cfg), cfg.stages):
        try:
            stage_cfg = build_config(planned.tree)
        except ConfigError as e:
            raise ConfigError(f"{planned.key} ({planned.name!r}): {e}") from None
        if planned.index < len(cfg.stages) - 1 and not stage_cfg.checkpoint.export_at_end:
            raise ConfigError(f"{planned.key}.checkpoint.export_at_end: stage {planned.name!r} must export: the "
                              "next stage starts from its export")
        stages.append(Stage(planned.index, planned.name, stage_cfg, planned.notes))
    return stages


def config_help() -> str:
    """Every run-config key with its default and documentation, one per line (--help-config)."""
    return dataclass_help(RunConfig)


__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "FromScratchConfig", "LogConfig", "LoraConfig",
    "ModelConfig", "RunConfig", "SourceSpec", "Stage", "TokenizerConfig", "TrainConfig",
    "build_config", "expand_stages", "config_help", "field_docs", "load_config", "parse_override", "to_dict",
]
