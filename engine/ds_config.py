"""Fill a DeepSpeed JSON template's "auto" fields from the run config.

The templates in configs/ds/ leave batch geometry, lr, clipping and precision as "auto" so that one
run config is the single source of truth. A value the user hard-coded is kept, but only if it agrees
with the run config: a contradiction (say train_batch_size != micro * accumulation * world size) is
an error naming both keys, because DeepSpeed would otherwise train with a geometry nobody asked for.

The run's optimizer is AdamW (train.lr, train.betas, train.weight_decay) and its schedule is warmup +
cosine (engine/schedule.py). A template's `optimizer` block other than that AdamW, or any
`scheduler` block, would silently replace them, so it is refused unless the run config says to use
it (train.use_deepspeed_optimizer / train.use_deepspeed_scheduler). Keys DeepSpeed does not know
and values it rejects are errors too (engine/ds_schema.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from engine import ds_schema
from engine.config import ConfigError, RunConfig

AUTO = "auto"
RUN_OPTIMIZER = {"type": "AdamW", "params": {"lr": AUTO, "betas": AUTO, "eps": 1e-8, "weight_decay": AUTO}}
"""The run's own optimizer, used when the template has no optimizer block."""
RUN_OPTIMIZER_PARAMS = frozenset({"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode"})
ADAM_TYPES = ("adam", "adamw")


def data_parallel_size(cfg: RunConfig, world_size: int) -> int:
    """Ranks that take different rows: the world, divided by the ranks that share each row."""
    sp = cfg.train.sequence_parallel
    if world_size % sp:
        raise ConfigError(f"train.sequence_parallel={sp} must divide the world size {world_size}")
    return world_size // sp


def grad_accum_steps(cfg: RunConfig, world_size: int) -> int:
    dp = data_parallel_size(cfg, world_size)
    per_step = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        what = f"world size {world_size}" if dp == world_size else f"data-parallel size {dp}"
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={cfg.train.micro_batch_size} x {what}"
        )
    return cfg.train.global_batch_size // per_step


def load_template(cfg: RunConfig, base_dir: Path | None = None) -> dict:
    path = Path(cfg.train.deepspeed)
    if not path.is_absolute() and not path.exists() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise ConfigError(f"train.deepspeed: DeepSpeed config {cfg.train.deepspeed} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed: {path} line {e.lineno}: invalid JSON ({e.msg})") from None


def _fill(tree: dict, dotted: str, value: Any, run_key: str, template: str) -> None:
    """Set tree[dotted] to value if it is "auto" or absent; if hard-coded, it must agree."""
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    leaf = parts[-1]
    current = node.get(leaf, AUTO)
    if current == AUTO:
        node[leaf] = value
        return
    same = (
        list(current) == list(value) if isinstance(value, (list, tuple)) and isinstance(current, (list, tuple))
        else abs(float(current) - float(value)) <= 1e-12 * max(1.0, abs(float(value)))
        if isinstance(value, (int, float)) and isinstance(current, (int, float)) and not isinstance(value, bool)
        else current == value
    )
    if not same:
        raise ConfigError(
            f"{template}: {dotted}={current!r} contradicts the run config ({run_key} gives {value!r}); "
            f'set it to "auto" or change {run_key}'
        )


def build_ds_config(cfg: RunConfig, world_size: int, *, on_cuda: bool, base_dir: Path | None = None) -> dict:
    """The DeepSpeed config dict for this run and world size, with every "auto" resolved."""
    template = cfg.train.deepspeed
    ds = copy.deepcopy(load_template(cfg, base_dir))
    ds_schema.check_keys(ds, template)
    _check_optimizer_block(ds, cfg, template)
    _check_scheduler_block(ds, cfg, template)
    gas = grad_accum_steps(cfg, world_size)
    t = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", template)
    _fill(ds, "gradient_accumulation_steps", gas, "train.global_batch_size / (micro x world)", template)
    # DeepSpeed is not told of sequence-parallel groups (engine/sequence_parallel.py): to it every
    # rank is data-parallel, and a row shared by a group counts once per rank.
    _fill(ds, "train_batch_size", t.global_batch_size * t.sequence_parallel, "train.global_batch_size", template)
    _fill(ds, "gradient_clipping", t.grad_clip, "train.grad_clip", template)
    _fill(ds, "bf16.enabled", cfg.model.dtype == "bf16", "model.dtype", template)
    _fill(ds, "fp16.enabled", cfg.model.dtype == "fp16", "model.dtype", template)

    opt = ds.get("optimizer")
    if opt is not None:
        _fill(ds, "optimizer.params.lr", t.lr, "train.lr", template)
        _fill(ds, "optimizer.params.betas", list(t.betas), "train.betas", template)
        _fill(ds, "optimizer.params.weight_decay", t.weight_decay, "train.weight_decay", template)
        if str(opt.get("type", "")).lower() in ADAM_TYPES:
            _choose_optimizer_impl(ds, t.optimizer_impl, on_cuda)
    sched = ds.get("scheduler")
    if sched is not None:
        params = sched.setdefault("params", {})
        if sched.get("type") == "WarmupCosineLR":
            _fill(ds, "scheduler.params.total_num_steps", t.max_steps, "train.max_steps", template)
            _fill(ds, "scheduler.params.warmup_num_steps", cfg.warmup_steps, "train.warmup_steps", template)
            _fill(ds, "scheduler.params.cos_min_ratio", t.min_lr_ratio, "train.min_lr_ratio", template)
        else:
            for k in list(params):
                if params[k] == AUTO:
                    raise ConfigError(f"{template}: scheduler.params.{k} is \"auto\", which is only "
                                      "filled for WarmupCosineLR")

    zero = ds.get("zero_optimization", {})
    for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(k) == AUTO:
            # Without a model in hand we use DeepSpeed's own defaults; the HF integration scales
            # them by hidden size, which matters only for speed, not correctness.
            zero[k] = {"reduce_bucket_size": int(5e8), "stage3_prefetch_bucket_size": int(5e7),
                       "stage3_param_persistence_threshold": int(1e5)}[k]
    if not on_cuda:  # pinned host memory only exists alongside a CUDA device
        for k in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(k), dict):
                zero[k]["pin_memory"] = False

    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(f"{template}: no run-config value fills {', '.join(leftover)}; set them explicitly")
    ds_schema.validate(ds, template, world_size)
    return ds


def _check_optimizer_block(ds: dict, cfg: RunConfig, template: str) -> None:
    """Keep the run's AdamW unless train.use_deepspeed_optimizer says to train with the template's."""
    opt = ds.get("optimizer")
    if opt is None:
        if cfg.train.use_deepspeed_optimizer:
            raise ConfigError(f"train.use_deepspeed_optimizer: true, but {template} has no optimizer block")
        ds["optimizer"] = copy.deepcopy(RUN_OPTIMIZER)
        return
    if not isinstance(opt, dict):
        raise ConfigError(f"{template}: optimizer must be a mapping with type and params, got {opt!r}")
    if cfg.train.use_deepspeed_optimizer:
        return
    params = opt.get("params") or {}
    foreign = sorted(set(params) - RUN_OPTIMIZER_PARAMS) if isinstance(params, dict) else ["params"]
    if str(opt.get("type", "")).lower() != "adamw" or foreign:
        what = f"type {opt.get('type')!r}" + (f" with params {', '.join(foreign)}" if foreign else "")
        raise ConfigError(
            f"{template}: its optimizer block ({what}) would replace the run's AdamW (train.lr, train.betas, "
            "train.weight_decay); remove the block, or set train.use_deepspeed_optimizer: true to train with it"
        )


def _check_scheduler_block(ds: dict, cfg: RunConfig, template: str) -> None:
    """Keep the run's warmup + cosine unless train.use_deepspeed_scheduler says otherwise."""
    sched = ds.get("scheduler")
    if sched is None:
        if cfg.train.use_deepspeed_scheduler:
            raise ConfigError(f"train.use_deepspeed_scheduler: true, but {template} has no scheduler block")
        return
    if not cfg.train.use_deepspeed_scheduler:
        kind = sched.get("type") if isinstance(sched, dict) else sched
        raise ConfigError(
            f"{template}: its scheduler block (type {kind!r}) would replace the run's warmup + cosine schedule "
            "(train.warmup_steps, train.min_lr_ratio); remove the block, or set "
            "train.use_deepspeed_scheduler: true to train with it"
        )
    if not isinstance(sched, dict):
        raise ConfigError(f"{template}: scheduler must be a mapping with type and params, got {sched!r}")


def _choose_optimizer_impl(ds: dict, impl: str, on_cuda: bool) -> None:
    """Pick the AdamW kernel. On CPU the fused CUDA kernel does not exist and DeepSpeed's
    cpu_adam takes minutes to compile, so `auto` uses torch's AdamW there."""
    zero = ds.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    if impl == "auto":
        impl = ("cpu_adam" if offload else "fused") if on_cuda else "torch"
    params = ds["optimizer"].setdefault("params", {})
    params.pop("torch_adam", None)
    if impl == "torch":
        params["torch_adam"] = True
        if offload:
            # DeepSpeed insists on its own CPU Adam with offload unless told otherwise.
            ds["zero_force_ds_cpu_optimizer"] = False
    elif impl == "fused" and offload:
        raise ConfigError("train.optimizer_impl=fused cannot run with offload_optimizer; use cpu_adam or torch")


def _find_auto(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        out = []
        for k, v in tree.items():
            out += _find_auto(v, f"{prefix}.{k}" if prefix else k)
        return out
    return [prefix] if tree == AUTO else []
