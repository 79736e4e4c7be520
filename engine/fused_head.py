"""The lm_head that computes the loss: FusedLMHead, put in place of the model's output Linear.

Why the loss runs inside the lm_head's forward: under ZeRO-3 the lm_head weight is partitioned,
and DeepSpeed gathers a module's parameters in its forward pre-hook (and releases them after).
The fused masked linear cross-entropy (engine/kernels) needs the whole weight but never the
[tokens, vocab] logits, so it must be the forward of the module that owns the weight. The head is
swapped in before deepspeed.initialize (CausalLMWithMaskedLoss does it when it is built), so
DeepSpeed's hooks see this module like any other.

The swap keeps everything else about the model: the same Parameter objects (tied embeddings stay
tied), the same module path and parameter names (`lm_head.weight`: checkpoints and the export
are unchanged), and without targets the forward is the plain Linear (generation works).
"""

from __future__ import annotations

from typing import Optional

import torch

from data_pipeline.schedule.labels import IGNORE_INDEX
from engine.kernels import masked_linear_cross_entropy, masked_linear_cross_entropy_by_group


class FusedLMHead(torch.nn.Linear):
    """A Linear lm_head whose forward, given targets, returns per-source (loss_sums, counts).

    targets are already shifted (data_pipeline/labels.shift_labels): row t of hidden predicts
    targets[t]; IGNORE_INDEX rows never reach the matmul. source_index assigns each row to one of
    num_sources groups (the per-source loss); without it there is one group.
    """

    def __init__(self, linear: torch.nn.Linear, *, num_sources: int = 1, backend: str = "auto",
                 strategy: str = "row_chunks"):
        # Built on the meta device, then given the original's parameters: no second weight is
        # ever allocated, and tied weights stay the one shared Parameter.
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.num_sources = num_sources
        self.backend = backend
        self.strategy = strategy

    def forward(self, hidden: torch.Tensor, targets: Optional[torch.Tensor] = None,
                source_index: Optional[torch.Tensor] = None):
        if targets is None:
            return super().forward(hidden)  # logits, for generation
        h = hidden.reshape(-1, hidden.shape[-1])
        y = targets.reshape(-1)
        # The kernels keep their own default ignore_index (they import only torch/triton); the
        # project's value, from data_pipeline/schedule/labels.py, is passed explicitly.
        if self.num_sources == 1 or source_index is None:
            loss, n = masked_linear_cross_entropy(h, self.weight, y, ignore_index=IGNORE_INDEX, bias=self.bias,
                                                  backend=self.backend, strategy=self.strategy)
            return loss.reshape(1), n.reshape(1)
        # One pass over all sources' rows, split by source inside the kernel: the cost and memory of
        # the single-source call (a call per source would read W three times and hold a dW each).
        return masked_linear_cross_entropy_by_group(
            h, self.weight, y, source_index.reshape(-1), self.num_sources, ignore_index=IGNORE_INDEX,
            bias=self.bias, backend=self.backend, strategy=self.strategy,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_sources={self.num_sources}, strategy={self.strategy}"


def install_fused_head(model, *, num_sources: int = 1, backend: str = "auto",
                       strategy: str = "row_chunks") -> FusedLMHead:
    """Put a FusedLMHead in place of the model's output Linear (before deepspeed.initialize)."""
    head = model.get_output_embeddings()
    if isinstance(head, FusedLMHead):
        return head
    if head is None or not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(model).__name__}: the fused loss needs a Linear lm_head")
    fused = FusedLMHead(head, num_sources=num_sources, backend=backend, strategy=strategy)
    model.set_output_embeddings(fused)
    return fused
