"""Cumulative per-source consumption and the realised mixture share, for TensorBoard.

A per-step figure says what one batch held; the questions users ask are cumulative: "how many
tokens of source X has the model seen so far?" and "is the mixture what I asked for?". The share
compares the samples drawn so far with the plan's target share (the mixture quotas), so a source
that is starved or over-drawn shows as a gap between the two curves. The counters travel with the
checkpoint (state_dict), so a resumed run keeps counting instead of restarting from zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class SourceConsumption:
    names: list[str]
    target_share: list[float]
    samples: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    response_tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.names)
        if len(self.target_share) != n:
            raise ValueError(f"consumption: {n} sources but {len(self.target_share)} target shares")
        for counter in ("samples", "tokens", "response_tokens"):
            if not getattr(self, counter):
                setattr(self, counter, [0] * n)

    @classmethod
    def from_quotas(cls, names: Sequence[str], quotas: Sequence[int]) -> "SourceConsumption":
        total = sum(quotas) or 1
        return cls(list(names), [q / total for q in quotas])

    def add(self, samples: Sequence[int], tokens: Sequence[int], response_tokens: Sequence[int]) -> None:
        """Add one global batch's per-source counts (already summed over ranks)."""
        for i in range(len(self.names)):
            self.samples[i] += int(samples[i])
            self.tokens[i] += int(tokens[i])
            self.response_tokens[i] += int(response_tokens[i])

    def realised_share(self) -> list[float]:
        total = sum(self.samples)
        return [s / total if total else 0.0 for s in self.samples]

    def scalars(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, (name, share) in enumerate(zip(self.names, self.realised_share())):
            out[f"mixture/{name}/cum_samples"] = float(self.samples[i])
            out[f"mixture/{name}/cum_tokens"] = float(self.tokens[i])
            out[f"mixture/{name}/cum_response_tokens"] = float(self.response_tokens[i])
            out[f"mixture/{name}/share"] = share
            out[f"mixture/{name}/target_share"] = self.target_share[i]
        return out

    def state_dict(self) -> dict:
        return {"names": list(self.names), "samples": list(self.samples), "tokens": list(self.tokens),
                "response_tokens": list(self.response_tokens)}

    def load_state_dict(self, state: dict) -> None:
        """Counters of a checkpoint; a checkpoint from before this existed, or of other sources, is
        ignored (the counters then start from the resume point)."""
        if not state or state.get("names") != self.names:
            return
        self.samples = [int(x) for x in state["samples"]]
        self.tokens = [int(x) for x in state["tokens"]]
        self.response_tokens = [int(x) for x in state["response_tokens"]]
