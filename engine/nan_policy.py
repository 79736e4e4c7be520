"""What a step with a non-finite loss or gradient does: stop the run, or skip the update.

Both signals are collective, so every rank takes the same decision without an extra all-reduce:
  * the step's loss is the all-reduced global token mean (trainer.StepTotals);
  * the gradient norm is DeepSpeed's global norm over all ranks' partitions. DeepSpeed's ZeRO
    optimizers (stage 1-3) and its bf16/fp16 optimizers already refuse to apply a step whose global
    gradient norm is NaN/inf: they drop the gradients, leave weights, Adam moments and the Adam step
    count untouched, and do not advance the lr schedule (engine.skipped_steps counts it).

nan_policy=stop (default): a non-finite loss, or a step the optimizer refused, ends the run with an
error naming the step and the per-source losses (under fp16 dynamic loss scaling a refused step is
the normal overflow handling and is not an error).

nan_policy=skip: such a step is dropped on every rank: no weight, moment or lr-schedule update (the
lr schedule therefore lags the step counter by one per skipped step), the global batch counts as
consumed (the data position advances, so a poisoned batch is not retried forever) and the skip is
logged. It needs an optimizer that refuses non-finite steps: ZeRO stage >= 1 or bf16/fp16; plain
fp32 ZeRO-0 uses torch's AdamW directly, which would apply NaN, so that combination is refused at
start-up. A non-finite loss whose gradient the optimizer nevertheless applied cannot be undone and
stops the run in both policies.
"""

from __future__ import annotations

import math
from typing import Callable

from engine.config import ConfigError

POLICIES = ("stop", "skip")


class NonFiniteStepError(FloatingPointError):
    """A step produced a non-finite loss or gradient and the policy says stop."""


def skip_supported(zero_stage: int, dtype: str) -> bool:
    return zero_stage >= 1 or dtype in ("bf16", "fp16")


def check_policy_supported(policy: str, zero_stage: int, dtype: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"train.nan_policy: {policy!r} is not one of {', '.join(POLICIES)}")
    if policy == "skip" and not skip_supported(zero_stage, dtype):
        raise ValueError("train.nan_policy=skip needs an optimizer that refuses non-finite steps: ZeRO stage >= 1 "
                         f"or model.dtype bf16/fp16 (got ZeRO-{zero_stage}, {dtype})")


def check_nan_policy_config(policy: str, ds_config: dict, dtype: str) -> None:
    """The start-up check on the resolved DeepSpeed config (engine/preflight.py runs it before any
    data or model work): a ConfigError naming train.nan_policy."""
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    try:
        check_policy_supported(policy, zero_stage, dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def step_was_skipped(policy: str, step: int, loss: float, optimizer_refused: bool, *, loss_scaling: bool,
                     describe_sources: Callable[[], str]) -> bool:
    """True when this step was dropped under nan_policy=skip; raises when the run must stop."""
    refused = optimizer_refused and not loss_scaling
    if math.isfinite(loss) and not refused:
        return False
    if policy == "skip" and optimizer_refused:
        return True
    if math.isfinite(loss):
        reason = "non-finite gradient norm (the optimizer did not apply the step)"
    elif optimizer_refused:
        reason = f"non-finite loss {loss}"
    else:
        reason = f"non-finite loss {loss} with a finite gradient that was already applied"
    raise NonFiniteStepError(f"step {step}: {reason}; per-source losses {describe_sources()} "
                             f"(train.nan_policy={policy})")
