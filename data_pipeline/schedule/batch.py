"""The micro-batch: the one typed hand-over from the data pipeline to the model.

Training (stream.py) and evaluation (eval_batches.py) both produce MicroBatch through collate.py;
the engine reads its fields by name and feeds `model_inputs()` to the model, so a field added for
faster attention or sequence parallelism is added here once, with its meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

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
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    source_index: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    sample_ids: list[list[SampleId]]

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: Union[str, torch.device]) -> "MicroBatch":
        """The same batch with its tensors on `device`."""
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return replace(self, input_ids=self.input_ids.to(device), labels=self.labels.to(device),
                       position_ids=self.position_ids.to(device), source_index=self.source_index.to(device),
                       attention_mask=mask)

    def model_inputs(self, *, per_source: bool = True) -> dict[str, Optional[torch.Tensor]]:
        """Exactly the keyword arguments of the training module's forward (engine/loss.py).

        per_source=False leaves out source_index: the loss then comes back as one sum (evaluation:
        one set is one figure, whatever sources its rows came from).
        """
        inputs = {"input_ids": self.input_ids, "labels": self.labels, "attention_mask": self.attention_mask,
                  "position_ids": self.position_ids}
        if per_source:
            inputs["source_index"] = self.source_index
        return inputs
