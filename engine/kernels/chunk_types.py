"""What the fused cross-entropy algorithms take and give back, shared by both of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class NeededGrads:
    """Which inputs want a gradient."""

    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


@dataclass
class ChunkedResult:
    """Per kept row loss and the unscaled gradients of their sum in the inputs' dtypes (None when
    not needed)."""

    row_losses: torch.Tensor
    grad_hidden: Optional[torch.Tensor]
    grad_weight: Optional[torch.Tensor]
    grad_bias: Optional[torch.Tensor]
