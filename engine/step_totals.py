"""One optimizer step's figures over the whole global batch: per-source sums (one all-reduce), the
scalars logged for them, and the gradient norm where DeepSpeed does not track it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class StepTotals:
    """Per-source sums over the whole global batch (all ranks, all micro-batches)."""

    loss_sum: list[float]
    response_tokens: list[int]
    samples: list[int]
    tokens: list[int]

    @classmethod
    def all_reduced(cls, loss_sums: torch.Tensor, counts: dict[str, list[int]]) -> "StepTotals":
        n = len(loss_sums)
        packed = torch.cat([loss_sums.double(), torch.tensor(
            counts["response_tokens"] + counts["samples"] + counts["tokens"], dtype=torch.float64)])
        if dist.is_initialized():
            dist.all_reduce(packed)  # one collective for every per-source figure
        v = packed.tolist()
        ints = [int(round(x)) for x in v[n:]]
        return cls(v[:n], ints[:n], ints[n:2 * n], ints[2 * n:])

    @property
    def loss(self) -> float:
        return sum(self.loss_sum) / max(sum(self.response_tokens), 1)

    def describe(self, names: list[str]) -> str:
        return ", ".join(f"{name}={s / max(c, 1):.4g}" for name, s, c in zip(names, self.loss_sum, self.response_tokens))

    def source_scalars(self, names: list[str]) -> dict[str, float]:
        """source/<name>/{samples, tokens, response_tokens, loss} (loss only where a token trained)."""
        scalars = {}
        for i, name in enumerate(names):
            scalars[f"source/{name}/samples"] = float(self.samples[i])
            scalars[f"source/{name}/tokens"] = float(self.tokens[i])
            scalars[f"source/{name}/response_tokens"] = float(self.response_tokens[i])
            if self.response_tokens[i] > 0:
                scalars[f"source/{name}/loss"] = self.loss_sum[i] / self.response_tokens[i]
        return scalars


def all_reduce_ints(values: list[int]) -> list[int]:
    t = torch.tensor(values, dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return [int(v) for v in t]


def grad_norm_if_not_tracked(engine) -> Optional[float]:
    """DeepSpeed reports the global gradient norm only from its ZeRO/mixed-precision optimizers;
    without them (ZeRO-0, fp32) the full reduced gradients are on every rank: compute it here."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    squares = [p.grad.detach().double().pow(2).sum() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0
