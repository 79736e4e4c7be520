"""Fill a DeepSpeed JSON template's "auto" fields from the run config.

The templates in configs/ds/ leave batch geometry, lr, clipping and precision as "auto" so that one
run config is the single source of truth. A value the user hard-coded is kept, but only if it agrees
with the run config: a contradiction (say train_batch_size != micro * accumulation * world size) is
an error naming both keys, because DeepSpeed would otherwise train with a geometry nobody asked for.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from engine.config import ConfigError, RunConfig

AUTO = "auto"


def grad_accum_steps(cfg: RunConfig, world_size: int) -> int:
    per_step = cfg.train.micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={cfg.train.micro_batch_size} x world size {world_size}"
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
    gas = grad_accum_steps(cfg, world_size)
    t = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", template)
    _fill(ds, "gradient_accumulation_steps", gas, "train.global_batch_size / (micro x world)", template)
    _fill(ds, "train_batch_size", t.global_batch_size, "train.global_batch_size", template)
    _fill(ds, "gradient_clipping", t.grad_clip, "train.grad_clip", template)
    _fill(ds, "bf16.enabled", cfg.model.dtype == "bf16", "model.dtype", template)
    _fill(ds, "fp16.enabled", cfg.model.dtype == "fp16", "model.dtype", template)

    opt = ds.get("optimizer")
    if opt is not None:
        _fill(ds, "optimizer.params.lr", t.lr, "train.lr", template)
        _fill(ds, "optimizer.params.betas", list(t.betas), "train.betas", template)
        _fill(ds, "optimizer.params.weight_decay", t.weight_decay, "train.weight_decay", template)
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
    return ds


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
