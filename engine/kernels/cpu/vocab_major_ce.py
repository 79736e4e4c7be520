"""The fused loss's per-row cross-entropy step on CPU: one C++ kernel (cross_entropy.cpp) instead
of seven torch passes over each chunk's vocab-major logits block.

Same contract as row_cross_entropy_torch_ (engine/kernels/row_cross_entropy_torch.py): per-row
logsumexp(row) - row[label], and with write_grad the block becomes softmax - onehot(label). The
kernel takes the layout the CPU chunk loop forms (a [rows, V] view of a contiguous float32
[V, rows] block); any other input goes to the torch version.
"""

from __future__ import annotations

import torch

from engine.kernels.row_cross_entropy_torch import row_cross_entropy_torch_


def supported(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """Inputs the kernel takes: float32 CPU logits [rows, V] whose transpose is contiguous, int64 labels."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.T.is_contiguous() and labels.dtype == torch.int64 and labels.device.type == "cpu"
            and labels.shape == logits.shape[:1] and logits.numel() > 0)


def vocab_major_cross_entropy_(logits: torch.Tensor, labels: torch.Tensor, write_grad: bool, ops) -> torch.Tensor:
    """row_cross_entropy_torch_'s result, through the kernel `ops` where `supported`."""
    if not supported(logits, labels):
        return row_cross_entropy_torch_(logits, labels, write_grad)
    return ops.vocab_major_cross_entropy_(logits.T, labels.contiguous(), write_grad)
