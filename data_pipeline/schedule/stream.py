"""One rank's view of the global batches: schedule -> (packing) -> this rank's rows -> tensors.

Every rank computes the same global batch layout (which schedule positions go into which row:
only sample lengths are needed, read from the memory-mapped lengths arrays), then reads from the
sources only the samples of its own rows. Rank r owns the contiguous block of rows
[r * R, (r + 1) * R) with R = global_batch_size / world_size, and its j-th micro-batch is rows
[j * micro_batch_size, (j + 1) * micro_batch_size) of that block. The union over ranks is the
global batch whatever the world size.

Without packing a row is one sample, padded to the longest sample of its micro-batch (not to
seq_len; shapes vary per micro-batch). With packing a row is seq_len tokens of whole samples
(data_pipeline/schedule/packing.py). Padding-free (the trainer's default, data.padding_free), each
micro-batch is instead one row holding all its rows' samples end to end: no padding, no mask.
Which samples a micro-batch holds is the same either way. Balanced (data.balance_micro_batches),
the global batch's rows are dealt to the ranks' micro-batches by their token counts (balance.py)
instead of in schedule order: the same samples per step, so the same loss and gradients.

Resume: the state is (step, schedule position where the next global batch starts) plus a
fingerprint of the schedule inputs; loading it is O(1), no replay, and valid for any world size or
micro-batch size with the same global batch size.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np

from data_pipeline.schedule.balance import balanced_rows
from data_pipeline.schedule.batch import MicroBatch
from data_pipeline.schedule.collate import LoadedSample, collate_padding_free, collate_rows
from data_pipeline.schedule.mixture import MixtureSchedule
from data_pipeline.schedule.packing import PackedBatch, pack_global_batch
from data_pipeline.schedule.run_length import RunPlan, plan_run
from data_pipeline.spec import DataConfigError, SampleSource, SourceSpec

STATE_VERSION = 1


class StreamStateError(ValueError):
    """A data state dict cannot resume this stream (different schedule inputs or format)."""


def grad_accum_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """global_batch_size / (micro_batch_size * world_size), refusing anything that does not divide."""
    if micro_batch_size < 1 or world_size < 1 or global_batch_size < 1:
        raise DataConfigError(
            f"train.global_batch_size={global_batch_size}, train.micro_batch_size={micro_batch_size}, "
            f"world_size={world_size}: all must be >= 1"
        )
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise DataConfigError(
            f"train.global_batch_size={global_batch_size} is not a multiple of train.micro_batch_size "
            f"({micro_batch_size}) x world size ({world_size}) = {per_step}"
        )
    return global_batch_size // per_step


class SFTStream:
    """Deterministic per-rank stream of micro-batches for SFT (see module docstring)."""

    def __init__(
        self,
        sources: Sequence[SampleSource],
        specs: Sequence[SourceSpec],
        *,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        packing: bool,
        pad_id: int,
        total_steps: int,
        mask_format: str = "bool",
        pad_multiple: int = 1,
        padding_free: bool = False,
        balance: bool = False,
    ) -> None:
        if len(sources) != len(specs) or not sources:
            raise DataConfigError(f"data.sources: {len(specs)} specs but {len(sources)} prepared sources")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        self.grad_accum = grad_accum_steps(global_batch_size, micro_batch_size, world_size)
        self.sources = list(sources)
        self.source_names = [s.name for s in sources]
        self.seq_len, self.global_batch_size, self.micro_batch_size = seq_len, global_batch_size, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.packing, self.pad_id, self.total_steps, self.mask_format = packing, pad_id, total_steps, mask_format
        self.pad_multiple = pad_multiple  # rows cut into equal parts (sequence parallelism) pad to a multiple
        self.padding_free = padding_free  # each micro-batch one row of its samples end to end (collate.py)
        self.balance = balance  # rows dealt to micro-batches by tokens (balance.py), not in schedule order
        self._lengths = [np.asarray(s.lengths) for s in sources]  # views of the memory maps, no copy
        self._check_lengths(specs)
        self.plan: RunPlan = plan_run(
            specs, self._lengths, total_steps=total_steps, global_batch_size=global_batch_size,
            seq_len=seq_len, packing=packing, seed=seed,
        )
        self.schedule = MixtureSchedule([len(x) for x in self._lengths], self.plan.quotas, global_batch_size, seed)
        self.step = 0
        self.position = 0

    def _check_lengths(self, specs: Sequence[SourceSpec]) -> None:
        """One pass over each lengths array (memory-mapped): no sample may exceed seq_len."""
        for i, lengths in enumerate(self._lengths):
            if len(lengths) and int(lengths.max()) > self.seq_len:
                raise DataConfigError(
                    f"data.sources[{i}] ({specs[i].name!r}): longest sample has {int(lengths.max())} tokens "
                    f"but data.seq_len is {self.seq_len}; re-run prepare with this seq_len"
                )

    # ---- schedule inputs and resume -------------------------------------------------------------
    def schedule_inputs(self) -> dict[str, Any]:
        """Everything that decides which sample lands in which global batch row."""
        return {
            "schedule": self.schedule.fingerprint,
            "sources": self.source_names,
            "sizes": list(self.schedule.sizes),
            "quotas": list(self.schedule.quotas),
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "seq_len": self.seq_len,
            "packing": self.packing,
        }

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.schedule_inputs(), sort_keys=True).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "position": self.position,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "schedule_inputs": self.schedule_inputs(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise StreamStateError(f"data state: version {state.get('version')!r}, this code reads {STATE_VERSION}")
        if state.get("fingerprint") != self.fingerprint:
            saved, now = state.get("schedule_inputs", {}), self.schedule_inputs()
            changed = sorted(k for k in now if saved.get(k) != now[k])
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} != now {now[k]!r}" for k in changed)
            raise StreamStateError(
                "data state: the schedule inputs changed since the checkpoint, so resuming would repeat "
                f"or skip samples ({details or 'fingerprint differs'}). Restore them (data.sources, "
                "data.seed, data.seq_len, data.packing, train.global_batch_size, train.total_steps)"
            )
        self.step, self.position = int(state["step"]), int(state["position"])

    # ---- global batch layout ----------------------------------------------------------------
    def _length_at(self, position: int) -> int:
        source, index = self.schedule[position]
        return int(self._lengths[source][index])

    def global_layout(self, position: int) -> PackedBatch:
        """Rows of schedule positions for the global batch starting at `position` (all ranks agree)."""
        if self.packing:
            layout = pack_global_batch(position, self._length_at, self.global_batch_size, self.seq_len)
        else:
            rows = tuple((position + j,) for j in range(self.global_batch_size))
            layout = PackedBatch(position, position + self.global_batch_size, rows)
        if not self.balance:
            return layout
        tokens = [sum(self._length_at(p) for p in row) for row in layout.rows]
        return PackedBatch(layout.start, layout.end, balanced_rows(layout.rows, tokens, self.world_size,
                                                                   self.grad_accum, self.micro_batch_size))

    def _load(self, position: int) -> LoadedSample:
        source, index = self.schedule[position]
        input_ids, labels = self.sources[source].get(index)
        return LoadedSample(source, index, np.asarray(input_ids), np.asarray(labels))

    def next_step(self) -> list[MicroBatch]:
        """This rank's grad_accum micro-batches of the next global batch; advances the stream."""
        layout = self.global_layout(self.position)
        rows_per_rank = self.global_batch_size // self.world_size
        mine = layout.rows[self.rank * rows_per_rank : (self.rank + 1) * rows_per_rank]
        micro_batches = []
        for j in range(self.grad_accum):
            rows = [[self._load(p) for p in row] for row in mine[j * self.micro_batch_size : (j + 1) * self.micro_batch_size]]
            if self.padding_free:
                micro_batches.append(collate_padding_free(rows, self.pad_id, self.pad_multiple))
                continue
            pad_to = self.seq_len if self.packing else max(sum(len(s.input_ids) for s in row) for row in rows)
            pad_to = -(-pad_to // self.pad_multiple) * self.pad_multiple
            micro_batches.append(collate_rows(rows, pad_to, self.pad_id, self.mask_format))
        self.step += 1
        self.position = layout.end
        return micro_batches
