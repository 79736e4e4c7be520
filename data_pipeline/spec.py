"""Typed description of the data side of a run: sources and how they are tokenized and mixed.

These dataclasses are the contract between the run config (engine/config.py composes them) and
the data pipeline. They live here, not in engine/, because data_pipeline never imports engine.
Every field's docstring (the string literal under it) becomes the help text of the CLI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Protocol

FORMATS = ("auto", "alpaca", "sharegpt", "messages", "text", "chosen")
TRAIN_ON = ("all_assistant", "last_assistant", "everything")
TRUNCATION = ("truncate_prompt", "whole_turns", "drop")
ON_ERROR = ("strict", "skip")
DEDUP = ("none", "exact")
REASONING_TURNS = ("template", "every_turn")


class DataConfigError(ValueError):
    """A data-side setting is invalid. The message names the config key."""


SOURCE_NAME_PATTERN = re.compile(r"[^\W][\w.-]{0,99}")
"""A source name is a folder name under the prepared-data folder: letters, digits, `_ . -`, at
most 100 characters, not starting with `.` (`.`, `..` and the tool's `.tmp-*` / `.old-*` work
folders would otherwise be reachable) nor `-`."""


def check_source_name(name: str, key: str) -> None:
    """Raise DataConfigError naming `key` unless `name` is safe as one path component."""
    if not isinstance(name, str) or not SOURCE_NAME_PATTERN.fullmatch(name) or name.startswith("-"):
        raise DataConfigError(
            f"{key}: source name {name!r} is not allowed; use letters, digits, '_', '.' and '-' "
            "(at most 100, not starting with '.' or '-'), since it names the source's folder")


@dataclass
class SourceSpec:
    """One data source: a file, folder, glob or fsspec URL holding records of one format."""

    name: str = ""
    """Short unique name of the source; used for shard folders and per-source metrics."""
    path: str = ""
    """File, folder, glob or fsspec URL (s3://, gs://, hf://, ...). `builtin:zh_demo` is the
    project's own generated Chinese demo set."""
    format: str = "auto"
    """Record format: auto, alpaca, sharegpt, messages (OpenAI role/content), text, or chosen
    (preference pairs or KTO-labelled records, trained on the chosen / label-true answers)."""
    proportion: Optional[float] = None
    """Mixture weight (relative; normalised over the sources that give one)."""
    repeat: Optional[float] = None
    """Epochs over this source in the run (e.g. 2.0 means every sample twice)."""
    choose: Optional[int] = None
    """Exact number of samples to draw from this source over the run."""
    text_field: str = "text"
    """For format=text with JSON records: the field that holds the document."""
    eval_fraction: float = 0.0
    """Fraction of this source held out for evaluation (0 = none). The held-out samples are never
    trained on; which ones depends only on the source name and size (data_pipeline/selection/split.py)."""
    eval_count: Optional[int] = None
    """Exact number of samples held out for evaluation (instead of eval_fraction): a fixed-size
    eval set whatever the source size."""
    train_on: Optional[str] = None
    """Which tokens of this source's conversations train (all_assistant, last_assistant,
    everything); unset = data.train_on. Replay: SFT data mixed into a pretraining stage keeps its
    prompt masked with train_on: all_assistant while the stage's text trains on every token."""
    template_kwargs: dict = field(default_factory=dict)
    """Template arguments for this source, on top of data.template_kwargs (e.g. {enable_thinking:
    false} for a non-thinking source mixed with thinking ones)."""

    def validate(self, key: str) -> None:
        if not self.name:
            raise DataConfigError(f"{key}.name: every source needs a name")
        check_source_name(self.name, f"{key}.name")
        if not self.path:
            raise DataConfigError(f"{key}.path: source {self.name!r} has no path")
        if self.format not in FORMATS:
            raise DataConfigError(f"{key}.format: {self.format!r} is not one of {FORMATS}")
        given = [k for k in ("proportion", "repeat", "choose") if getattr(self, k) is not None]
        if len(given) > 1:
            raise DataConfigError(
                f"{key}: source {self.name!r} sets {' and '.join(given)}; give at most one of "
                "proportion, repeat, choose"
            )
        for k in ("proportion", "repeat"):
            v = getattr(self, k)
            if v is not None and not v > 0:
                raise DataConfigError(f"{key}.{k}: must be > 0, got {v}")
        if self.choose is not None and self.choose <= 0:
            raise DataConfigError(f"{key}.choose: must be > 0, got {self.choose}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise DataConfigError(f"{key}.eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if self.train_on is not None and self.train_on not in TRAIN_ON:
            raise DataConfigError(f"{key}.train_on: {self.train_on!r} is not one of {TRAIN_ON}")
        if not isinstance(self.template_kwargs, dict):
            raise DataConfigError(f"{key}.template_kwargs: expected a mapping, got {self.template_kwargs!r}")
        if self.eval_count is not None:
            if self.eval_count < 1:
                raise DataConfigError(f"{key}.eval_count: must be >= 1, got {self.eval_count}")
            if self.eval_fraction > 0:
                raise DataConfigError(f"{key}: source {self.name!r} sets eval_fraction and eval_count; give one")


@dataclass
class DataConfig:
    """How raw sources become token ids, loss masks and batches."""

    sources: list[SourceSpec] = field(default_factory=list)
    """The training sources (see SourceSpec)."""
    eval_sources: list[SourceSpec] = field(default_factory=list)
    """Evaluation-only sources (same fields as sources; mixture fields are ignored): evaluated
    every eval.every_steps and at the end, each reported as eval/<name>/loss, never trained on."""
    template: str = "auto"
    """Chat template: auto (the tokenizer's own, else chatml), chatml, qwen, llama3, chatglm,
    zh_plain (指令/回答), qwen3 (thinking and non-thinking), deepseek-r1 (pre-fills <think>), or a
    path to a Jinja file."""
    template_kwargs: dict = field(default_factory=dict)
    """Arguments passed to the chat template when rendering and when forming each turn's
    generation prompt, like apply_chat_template's extra kwargs (e.g. {enable_thinking: true}; the
    shared Qwen3-style template reads open_thinking). A source's template_kwargs update these."""
    reasoning_turns: str = "template"
    """Reasoning of earlier turns that the template drops (Qwen3 and DeepSeek-R1 keep only the
    turns after the last user message): template = train reasoning only where the template keeps
    it (matches inference; dropped ones are counted and reported); every_turn = one sample per
    assistant turn rendered as the last, so every turn's reasoning trains (counted)."""
    train_on: str = "all_assistant"
    """Which tokens of conversations train: all_assistant, last_assistant, or everything (a
    source's own train_on overrides it; plain-text documents always train on every token)."""
    seq_len: int = 1024
    """Tokens per training sequence (the packing length, and the truncation limit)."""
    truncation: str = "truncate_prompt"
    """Over-long conversations lose whole exchanges, oldest first (never the system prompt or tool
    definitions, never starting inside a message); when the last exchange alone does not fit:
    truncate_prompt cuts the start of its user message, whole_turns drops the sample. drop: drop
    every over-long sample. Each outcome is counted in the manifest."""
    on_error: str = "skip"
    """Bad records: strict (stop at the first, naming file/line/field) or skip (count, report)."""
    max_skip_fraction: float = 0.5
    """With on_error=skip: prepare fails when a source skips more than this fraction of its records
    (a broken file or a wrong format must not pass as "a few bad records"); 1.0 never fails."""
    dedup: str = "none"
    """exact: train on the first occurrence of each sample only (same tokens and loss mask),
    dropping repeats inside each source (and eval source) before the held-out split; none: keep
    them. prepare reports the duplicates either way."""
    packing: bool = True
    """Pack several samples into one sequence (no attention across samples)."""
    padding_free: bool = True
    """Lay each micro-batch's samples end to end in one row, position ids restarting per sample,
    with no attention mask: attention runs within each sample (engine/segment_attention.py), no
    [L, L] mask is built and no padding is computed. Same loss and gradients as padded rows with
    a block-diagonal mask (false), which eager attention needs."""
    balance_micro_batches: bool = True
    """Deal each global batch's rows to the ranks' micro-batches by token count (longest first, to
    the lightest; data_pipeline/schedule/balance.py) rather than in schedule order, so that ranks
    wait less for each other at every gradient reduction. The step trains the same samples either
    way (same loss and gradients); only which rank computes which changes."""
    seed: int = 1234
    """Seed of the mixture schedule and shuffles."""
    prepared_dir: str = ""
    """Where tokenized shards go; empty = <run_dir>/data. Shards are reused when inputs match."""
    num_proc: int = 0
    """Processes for `prepare`; 0 = all cores."""
    cache_dir: str = ""
    """Local folder where shards of a prepared_dir given as an fsspec URL (s3://, gs://, ...) are
    copied, verified against the manifest and memory-mapped; empty = $XDG_CACHE_HOME/zhiling/shards
    (~/.cache/zhiling/shards). Needs room for the shards this node reads."""
    prefetch_shards: int = 2
    """For a URL prepared_dir: shards copied ahead of use by a background thread (0 = on demand only)."""
    log_sample_ids: bool = False
    """Debug: write per step the global sample ids each rank consumed (jsonl in the run dir)."""

    def validate(self, key: str = "data") -> None:
        if not self.sources:
            raise DataConfigError(f"{key}.sources: at least one source is required")
        names = set()
        for i, s in enumerate(self.sources):
            s.validate(f"{key}.sources[{i}]")
            if s.name in names:
                raise DataConfigError(f"{key}.sources[{i}].name: duplicate source name {s.name!r}")
            names.add(s.name)
        for i, s in enumerate(self.eval_sources):
            s.validate(f"{key}.eval_sources[{i}]")
            if s.name in names:  # eval/<name>/loss must say which set it is
                raise DataConfigError(f"{key}.eval_sources[{i}].name: {s.name!r} is already a source name")
            names.add(s.name)
        for k, allowed in (("train_on", TRAIN_ON), ("truncation", TRUNCATION), ("on_error", ON_ERROR),
                           ("dedup", DEDUP)):
            if getattr(self, k) not in allowed:
                raise DataConfigError(f"{key}.{k}: {getattr(self, k)!r} is not one of {allowed}")
        if not isinstance(self.template_kwargs, dict):
            raise DataConfigError(f"{key}.template_kwargs: expected a mapping, got {self.template_kwargs!r}")
        if self.reasoning_turns not in REASONING_TURNS:
            raise DataConfigError(f"{key}.reasoning_turns: {self.reasoning_turns!r} is not one of {REASONING_TURNS}")
        if self.prefetch_shards < 0:
            raise DataConfigError(f"{key}.prefetch_shards: must be >= 0, got {self.prefetch_shards}")
        fraction = self.max_skip_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise DataConfigError(f"{key}.max_skip_fraction: must be in [0, 1], got {self.max_skip_fraction!r}")
        if self.seq_len < 8:
            raise DataConfigError(f"{key}.seq_len: must be >= 8, got {self.seq_len}")


def source_train_on(spec: SourceSpec, data_cfg: DataConfig) -> str:
    """The train_on that applies to `spec`: its own, else the data config's."""
    return spec.train_on or data_cfg.train_on


class SampleSource(Protocol):
    """What the mixture/stream side needs from one prepared (tokenized) source.

    Implemented by data_pipeline.store.shards.ShardedSource (memory-mapped shards on disk) and by
    small in-memory fakes in tests. Samples are addressed by a dense index 0..len-1.
    """

    name: str

    def __len__(self) -> int: ...

    @property
    def lengths(self):  # numpy int array [len]: tokens per sample, without reading the samples
        ...

    def get(self, index: int):
        """Return (input_ids, labels) as 1-D numpy int arrays of equal length.

        labels[t] == input_ids[t] where token t is trained, -100 elsewhere. Labels are NOT
        shifted: the loss shifts them once (engine/loss.py)."""
        ...
