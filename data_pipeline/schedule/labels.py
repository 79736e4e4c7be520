"""What a label means: the one definition every room reads (store, collate, accounting, loss).

The contract (docs/ARCHITECTURE.md, "How a record becomes a loss", steps 6 and 7):

  * labels are aligned with input_ids, NOT shifted: labels[t] is input_ids[t] when token t trains
    and IGNORE_INDEX otherwise (shards.py writes them from the per-token mask);
  * the first token of every sample is IGNORE_INDEX (`sample_labels`, applied when samples are laid
    into rows): nothing of that sample comes before it, so nothing may learn to predict it, and in a
    packed row the last token of sample A never learns to predict the first token of sample B;
  * the loss shifts once, here (`shift_labels`): position t is trained to predict labels[t + 1].

Because of the first-token rule, the tokens that train are the same set before and after the
shift, so a count taken on the unshifted labels (the data side's accounting) equals the count the
loss divides by (`count_targets`).

Why unshifted labels and one shift in the loss, rather than shifted targets made by the data side:
labels stay in the convention of HF causal LMs (`model(input_ids, labels=labels)` shifts the same
way), which the plain HF loss path, the tests' references and external tools rely on. A change that
splits a row across ranks (sequence parallelism) must shift the full row before splitting it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch stays out of the import: shards.py (and prepare's workers) read this module
    import torch

IGNORE_INDEX = -100
"""The label of a token that does not train (prompt, template, padding, a sample's first token)."""


def sample_labels(labels: np.ndarray) -> np.ndarray:
    """A sample's stored labels as they enter a row: a copy whose first token does not train."""
    out = np.array(labels, dtype=np.int64, copy=True)
    if len(out):
        out[0] = IGNORE_INDEX
    return out


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets aligned with the positions that predict them: out[..., t] = labels[..., t + 1].

    The last position predicts nothing (ignore_index). Packed rows need no special case: the first
    token of every packed sample is ignore_index (`sample_labels`).
    """
    out = labels.new_full(labels.shape, ignore_index)
    out[..., :-1] = labels[..., 1:]
    return out


def count_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Response tokens that will be trained in a micro-batch (after the shift)."""
    return int((labels[..., 1:] != ignore_index).sum())
