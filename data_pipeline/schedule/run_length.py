"""How many samples each source contributes to a run of known length (its integer quota).

Rules (one per SourceSpec field, see data_pipeline/spec.py):
  * repeat: r   -> the source's count is fixed at round(r * len(source)) samples.
  * choose: c   -> the source's count is fixed at c samples (c > len means extra passes).
  * proportion  -> the "pool" sources share what the fixed ones leave, by weight.
  * none of the three -> a pool source weighted by its size (natural mixing). If the pool mixes
    explicit proportions with unweighted sources, the explicit proportions are fractions of the
    pool (they must sum to < 1) and the unweighted sources share the rest by size; if all pool
    sources give a proportion, the proportions are relative weights (normalised).
If there is no pool and the fixed counts do not add up to the run, the run length wins and the
fixed counts are scaled to it (use `total_samples_for` to size the run so that they match).

All counts are integers from largest-remainder apportionment, so they sum exactly to the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np

from data_pipeline.schedule.mixture import MixtureSchedule, hamilton_counts
from data_pipeline.schedule.packing import pack_global_batch
from data_pipeline.spec import DataConfigError, SourceSpec

_WEIGHT_DENOMINATOR = 10**9
"""Proportions are floats in the config; 0.7 should mean exactly 7/10, so each is read as the
closest fraction with denominator <= 1e9 (any finer difference is noise in a YAML number)."""


def fixed_count(spec: SourceSpec, size: int) -> Optional[int]:
    """The run-independent sample count a source asks for (repeat/choose), else None."""
    if spec.choose is not None:
        return int(spec.choose)
    if spec.repeat is not None:
        return max(1, round(spec.repeat * size))
    return None


def pool_weights(specs: Sequence[SourceSpec], sizes: Sequence[int], key: str = "data.sources") -> dict[int, Fraction]:
    """Exact share of the pool (sources without repeat/choose) for each pool source index."""
    pool = [i for i, s in enumerate(specs) if fixed_count(s, sizes[i]) is None]
    explicit = {i: Fraction(specs[i].proportion).limit_denominator(_WEIGHT_DENOMINATOR) for i in pool if specs[i].proportion is not None}
    natural = [i for i in pool if i not in explicit]
    if not natural:
        total = sum(explicit.values())
        return {i: w / total for i, w in explicit.items()}
    explicit_sum = sum(explicit.values(), Fraction(0))
    if explicit_sum >= 1:
        raise DataConfigError(
            f"{key}: sources {sorted(specs[i].name for i in explicit)} give proportions summing to "
            f"{float(explicit_sum):g} while {sorted(specs[i].name for i in natural)} give none; with such "
            "a mix, proportions are fractions of the run and must sum to < 1 (or give every source one)"
        )
    natural_size = sum(sizes[i] for i in natural)
    if natural_size == 0:
        raise DataConfigError(f"{key}: sources {[specs[i].name for i in natural]} are empty")
    shares = dict(explicit)
    for i in natural:
        shares[i] = (1 - explicit_sum) * Fraction(sizes[i], natural_size)
    return shares


def source_quotas(specs: Sequence[SourceSpec], sizes: Sequence[int], total_samples: int, key: str = "data.sources") -> list[int]:
    """Integer samples per source over a run of `total_samples` draws (sums to total_samples)."""
    if len(specs) != len(sizes):
        raise ValueError(f"{key}: {len(specs)} specs but {len(sizes)} sources")
    if total_samples < 1:
        raise DataConfigError(f"train.total_steps: the run must draw >= 1 sample, got {total_samples}")
    for i, (spec, n) in enumerate(zip(specs, sizes)):
        if n < 1:
            raise DataConfigError(f"{key}[{i}] ({spec.name!r}): the prepared source is empty")
    fixed = {i: c for i, s in enumerate(specs) if (c := fixed_count(s, sizes[i])) is not None}
    fixed_total = sum(fixed.values())
    shares = pool_weights(specs, sizes, key) if len(fixed) < len(specs) else {}
    if not shares:  # only repeat/choose sources: scale them to the run
        return hamilton_counts(total_samples, [fixed.get(i, 0) for i in range(len(specs))])
    rest = total_samples - fixed_total
    if rest < len(shares):
        raise DataConfigError(
            f"{key}: repeat/choose sources {sorted(specs[i].name for i in fixed)} need {fixed_total} "
            f"samples but the run draws only {total_samples}, leaving nothing for "
            f"{sorted(specs[i].name for i in shares)}; raise train.total_steps or lower repeat/choose"
        )
    denominator = math.lcm(*(w.denominator for w in shares.values()))
    pool_order = sorted(shares)
    pool_counts = hamilton_counts(rest, [int(shares[i] * denominator) for i in pool_order])
    quotas = [fixed.get(i, 0) for i in range(len(specs))]
    for i, c in zip(pool_order, pool_counts):
        quotas[i] = c
    return quotas


def total_samples_for(
    specs: Sequence[SourceSpec],
    sizes: Sequence[int],
    *,
    epochs_of: Optional[str] = None,
    epochs: float = 1.0,
) -> int:
    """Samples a run must draw so that the named pool source gets `epochs` passes.

    With epochs_of=None, every source must fix its own count (repeat/choose) and the answer is
    their sum. Divide by samples per step (global_batch_size without packing, the packer's
    measured figure with it; see data_pipeline.schedule.stream.plan_run) to get total steps."""
    fixed = {i: c for i, s in enumerate(specs) if (c := fixed_count(s, sizes[i])) is not None}
    fixed_total = sum(fixed.values())
    if epochs_of is None:
        if len(fixed) < len(specs):
            raise DataConfigError("train.total_steps: not set, and some sources have no repeat/choose to size the run by")
        return fixed_total
    names = [s.name for s in specs]
    if epochs_of not in names:
        raise DataConfigError(f"epochs_of: no source named {epochs_of!r} (have {names})")
    target = names.index(epochs_of)
    if target in fixed:
        raise DataConfigError(f"epochs_of: source {epochs_of!r} already fixes its count with repeat/choose")
    share = pool_weights(specs, sizes)[target]
    return fixed_total + math.ceil(Fraction(epochs).limit_denominator(_WEIGHT_DENOMINATOR) * sizes[target] / share)


def mean_length(lengths_per_source: Sequence[np.ndarray], quotas: Sequence[int]) -> float:
    """Expected tokens per drawn sample under the quotas (one pass over the lengths arrays only)."""
    total = sum(quotas)
    return sum(q * float(np.mean(lengths)) for q, lengths in zip(quotas, lengths_per_source) if q) / total


def measure_samples_per_step(
    schedule: MixtureSchedule,
    lengths_per_source: Sequence[np.ndarray],
    global_batch_size: int,
    seq_len: int,
    max_steps: int,
    max_samples: int = 8192,
) -> float:
    """Average samples the packer puts in one global batch, from packing the run's first batches
    (at most max_steps of them, stopping once max_samples samples are packed: start-up cost is
    bounded whatever the data size)."""

    def length_at(position: int) -> int:
        source, index = schedule[position]
        return int(lengths_per_source[source][index])

    position, steps = 0, 0
    while steps == 0 or (steps < max_steps and position < max_samples):
        position = pack_global_batch(position, length_at, global_batch_size, seq_len).end
        steps += 1
    return position / steps


@dataclass(frozen=True)
class RunPlan:
    """Integer draws per source for the run, and the sample count they were sized for."""

    quotas: tuple[int, ...]
    total_samples: int
    samples_per_step: float


def plan_run(
    specs: Sequence[SourceSpec],
    lengths_per_source: Sequence[np.ndarray],
    *,
    total_steps: int,
    global_batch_size: int,
    seq_len: int,
    packing: bool,
    seed: int,
) -> RunPlan:
    """Quotas for a run of `total_steps` global batches.

    Without packing a step draws exactly global_batch_size samples, so repeat/choose counts are met
    exactly. With packing a step draws a variable number of samples: the plan packs the first
    ~8k samples of a provisional schedule to measure samples per step, sizes the run by it, and
    repeat/choose counts are then met up to that estimate's error (each pass is still a
    permutation: no sample repeats before its pass is complete)."""
    if total_steps < 1:
        raise DataConfigError(f"train.total_steps: must be >= 1, got {total_steps}")
    sizes = [len(lengths) for lengths in lengths_per_source]
    if not packing:
        total = total_steps * global_batch_size
        return RunPlan(tuple(source_quotas(specs, sizes, total)), total, float(global_batch_size))
    provisional = source_quotas(specs, sizes, total_steps * global_batch_size)
    guess = max(1, int(total_steps * global_batch_size * seq_len / mean_length(lengths_per_source, provisional)))
    provisional = source_quotas(specs, sizes, guess)
    per_step = measure_samples_per_step(MixtureSchedule(sizes, provisional, global_batch_size, seed), lengths_per_source, global_batch_size, seq_len, total_steps)
    total = max(1, math.ceil(total_steps * per_step))
    return RunPlan(tuple(source_quotas(specs, sizes, total)), total, per_step)
