"""The micro-batch: the one typed hand-over from the data pipeline to the model.

Training (stream.py) and evaluation (eval_batches.py) both produce MicroBatch through collate.py;
the engine reads its fields by name and feeds `model_inputs()` to the model, so a field added for
faster attention or sequence parallelism is added here once, with its meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

from data_pipeline.schedule.labels import shift_labels

SampleId = tuple[int, int]
"""(source index, sample index within that source): a sample's global id."""


@dataclass(frozen=True)
class MicroBatch:
    """[rows, length] tensors of whole samples laid end to end per row, right-padded.

    input_ids:      token ids; padding holds the tokenizer's pad id.
    labels:         unshifted, IGNORE_INDEX where nothing trains (data_pipeline/schedule/labels.py).
    position_ids:   restart at 0 with every sample (rotary embeddings see each sample alone).
    source_index:   the source of each token (per-source loss groups), -1 on padding.
    attention_mask: block-diagonal causal mask in the collate's mask_format, or None ("none":
                    the attention kernel derives the segments from position_ids).
    sample_ids:     per row, the ids of its samples in order (not a tensor: logging, accounting).
    targets:        None, or (a sequence shard) the labels already shifted, then cut: the shard's
                    positions and what each predicts (`sequence_shard`); labels then hold the
                    shard's unshifted labels, for accounting only.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    source_index: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    sample_ids: list[list[SampleId]]
    targets: Optional[torch.Tensor] = None

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: Union[str, torch.device]) -> "MicroBatch":
        """The same batch with its tensors on `device`."""
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        targets = None if self.targets is None else self.targets.to(device)
        return replace(self, input_ids=self.input_ids.to(device), labels=self.labels.to(device),
                       position_ids=self.position_ids.to(device), source_index=self.source_index.to(device),
                       attention_mask=mask, targets=targets)

    def sequence_shard(self, rank: int, size: int) -> "MicroBatch":
        """Part `rank` of `size` equal cuts along the sequence, for sequence parallelism.

        The whole rows are shifted first (data_pipeline/schedule/labels.py): the target of the last
        position of a cut is the first label of the next cut, which only the full row knows. The
        mask is dropped: attention then sees the whole row again (engine/sequence_parallel.py) and
        finds the samples from the position ids, which are kept, global, for every cut.
        """
        length = int(self.input_ids.shape[1])
        if length % size:
            raise ValueError(f"sequence_shard: rows of {length} tokens do not cut into {size} equal parts")
        if self.targets is not None:
            raise ValueError("sequence_shard: this batch is already a shard")
        cut = slice(rank * (length // size), (rank + 1) * (length // size))
        return replace(self, input_ids=self.input_ids[:, cut], labels=self.labels[:, cut],
                       position_ids=self.position_ids[:, cut], source_index=self.source_index[:, cut],
                       attention_mask=None, targets=shift_labels(self.labels)[:, cut])

    def model_inputs(self, *, per_source: bool = True) -> dict[str, Optional[torch.Tensor]]:
        """Exactly the keyword arguments of the training module's forward (engine/loss.py).

        per_source=False leaves out source_index: the loss then comes back as one sum (evaluation:
        one set is one figure, whatever sources its rows came from).
        """
        if self.targets is not None:  # a sequence shard: shifted already, no mask
            inputs = {"input_ids": self.input_ids, "targets": self.targets, "position_ids": self.position_ids}
        else:
            inputs = {"input_ids": self.input_ids, "labels": self.labels, "attention_mask": self.attention_mask,
                      "position_ids": self.position_ids}
        if per_source:
            inputs["source_index"] = self.source_index
        return inputs
