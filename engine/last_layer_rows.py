"""The last decoder layer computes its attention output projection and MLP on target rows only.

Only rows with a target (response tokens; every token in continued pretraining) reach the loss:
the fused lm_head drops the others before its matmul. Below the head everything is per row
(the final norm, the last layer's residual adds, its MLP and output projection), except the
attention itself, whose keys and values come from every earlier row. So in the last layer the
output projection and the MLP of a prompt or padding row feed nothing that is ever used, and
skipping them changes neither the loss nor any gradient:

    o_proj(x) -> zeros, with o_proj(x[rows]) written into the target rows
    mlp(x)    -> zeros, with mlp(x[rows]) written into the target rows

The skipped rows' outputs become 0 instead of values the loss never reads; their gradient is 0
either way. What is saved is the prompt share of two of the layer's projections and its whole
MLP (forward and backward): the more prompt a dataset has, the more it saves.

The selection holds only inside CausalLMWithMaskedLoss.forward (`LastLayerRows.only`): generation,
evaluation through the plain model and anything else that calls the layer sees the whole module.
It is not installed under gradient checkpointing (the layer is recomputed in backward, outside
the forward that chose the rows), for MLPs that are not the dense gate/up/down kind (a mixture
of experts routes on every row) or when a model has no `layers` list with `self_attn.o_proj` and
`mlp` in its last layer; `describe` says which.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from data_pipeline.schedule.labels import IGNORE_INDEX

DENSE_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def last_decoder_layer(lm: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The last block of a HF causal LM's decoder (through a PEFT wrapper), or None."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        return None
    return layers[-1]


class LastLayerRows:
    """The target rows of the forward in progress, and the two forwards of the last layer that use them."""

    def __init__(self) -> None:
        self.rows: Optional[torch.Tensor] = None  # flat row indices [R] while a forward runs, else None
        self.modules: list[str] = []
        self.reason: Optional[str] = None

    def install(self, lm: torch.nn.Module) -> "LastLayerRows":
        """Wrap the last layer's `self_attn.o_proj` and `mlp` forwards (on the instances: parameter
        names, hooks and checkpoints are untouched)."""
        checkpointing = getattr(lm, "is_activation_checkpointing", None)  # transformers >= 5.x's name
        if checkpointing is None:
            checkpointing = getattr(lm, "is_gradient_checkpointing", False)
        if checkpointing:
            self.reason = "gradient checkpointing recomputes the layer outside the forward"
            return self
        layer = last_decoder_layer(lm)
        attention = getattr(layer, "self_attn", None)
        o_proj, mlp = getattr(attention, "o_proj", None), getattr(layer, "mlp", None)
        if o_proj is None or mlp is None:
            self.reason = "the model's last layer has no self_attn.o_proj and mlp"
            return self
        if not all(hasattr(mlp, name) for name in DENSE_MLP_PROJECTIONS):
            self.reason = f"the last layer's MLP ({type(mlp).__name__}) is not a dense gate/up/down MLP"
            return self
        for name, module in (("self_attn.o_proj", o_proj), ("mlp", mlp)):
            module.forward = self._rows_only(module.forward)
            self.modules.append(name)
        return self

    @contextlib.contextmanager
    def only(self, targets: torch.Tensor) -> Iterator[None]:
        """Within the block, the wrapped forwards compute the rows where `targets` (shifted, the
        layout of the hidden states) is not IGNORE_INDEX."""
        if not self.modules:
            yield
            return
        self.rows = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
        try:
            yield
        finally:
            self.rows = None

    def _rows_only(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def rows_only_forward(x: torch.Tensor) -> torch.Tensor:
            rows = self.rows
            flat = x.reshape(-1, x.shape[-1])
            # No selection, or nothing to skip: the module as it is. No targets at all: also the
            # whole module (the loss is 0 either way, and every parameter keeps a gradient).
            if rows is None or rows.numel() in (0, flat.shape[0]):
                return forward(x)
            selected = forward(flat.index_select(0, rows).unsqueeze(0)).squeeze(0)
            out = selected.new_zeros(flat.shape[0], selected.shape[-1]).index_copy(0, rows, selected)
            return out.view(*x.shape[:-1], selected.shape[-1])

        return rows_only_forward

    def describe(self) -> str:
        if self.modules:
            return f"last layer: {' and '.join(self.modules)} on target rows only"
        return f"last layer: every row ({self.reason or 'not installed'})"
