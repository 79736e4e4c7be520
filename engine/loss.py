"""The SFT loss: response tokens only, normalised by the global count of response tokens.

Invariant 1 of docs/ARCHITECTURE.md: the gradient of one optimizer step equals the gradient of
    (sum of per-token CE over all response tokens in the global batch) / (their global count)
whatever the split into micro-batches, accumulation steps and ranks. The usual per-micro-batch
mean gets this wrong whenever micro-batches hold different numbers of response tokens: a token
in a micro-batch with few response tokens then weighs more than one in a crowded micro-batch.
So the trainer counts the step's response tokens on every rank first, all-reduces the count once,
and each micro-batch contributes loss_sum / global_count, pre-multiplied to undo DeepSpeed's own
1/accumulation scaling and its mean over data-parallel ranks.

What labels mean, and the one shift for next-token prediction, are data_pipeline/schedule/labels.py's.

The loss never materialises [tokens, vocab] logits: the model body produces hidden states and the
lm_head, a FusedLMHead (engine/fused_head.py), runs the fused masked linear cross-entropy
(engine/kernels) as its own forward, which drops prompt rows before any matmul and lets ZeRO-3
gather the partitioned weight as for any module.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from data_pipeline.schedule.labels import IGNORE_INDEX, shift_labels
from engine.fused_head import install_fused_head
from engine.last_layer_rows import LastLayerRows

_UNSUPPORTED_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def fused_loss_supported(model) -> bool:
    """Models that transform logits after the lm_head (soft-capping, scaling) need the HF path."""
    cfg = model.config
    return not any(getattr(cfg, k, None) not in (None, 1.0) for k in _UNSUPPORTED_LOGIT_TRANSFORMS)


def hf_path_loss_sums(model, targets: torch.Tensor, source_index: Optional[torch.Tensor], num_sources: int,
                      **model_inputs):
    """Per-source (loss sums, counts) from the model's full logits: the reference, and the path for
    models whose logits are transformed after the lm_head."""
    logits = model(**model_inputs, use_cache=False).logits.float()
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    y = targets.reshape(-1)
    if source_index is None or num_sources == 1:
        return per_token.sum().reshape(1), (y != IGNORE_INDEX).sum().reshape(1)
    src = source_index.reshape(-1)
    keep = y != IGNORE_INDEX
    losses = torch.stack([per_token[(src == s) & keep].sum() for s in range(num_sources)])
    counts = torch.stack([((src == s) & keep).sum() for s in range(num_sources)])
    return losses, counts


def scaled_for_deepspeed(loss_sum: torch.Tensor, global_count: int, world_size: int, grad_accum: int) -> torch.Tensor:
    """What to hand to engine.backward so that the step's gradient is grad(sum CE) / global_count.

    DeepSpeed divides the loss by grad_accum before backward and averages gradients over the
    data-parallel ranks, so both factors are multiplied back in here. With sequence parallelism
    DeepSpeed is not told of the groups (engine/sequence_parallel.py): it averages over every rank,
    and world_size stays the whole world.
    """
    return loss_sum * (world_size * grad_accum / max(global_count, 1))


class CausalLMWithMaskedLoss(torch.nn.Module):
    """The module DeepSpeed wraps: a HF causal LM whose forward returns per-source loss sums.

    Going through one module forward keeps DeepSpeed's engine bookkeeping (ZeRO-3 parameter
    fetching, hooks) intact; `.lm` is the plain HF model for generation and export (its lm_head is
    a FusedLMHead when the fused loss applies, which is still a Linear with the same parameters).
    `.last_layer` skips the last layer's prompt rows once installed (engine/last_layer_rows.py).
    """

    def __init__(self, lm, *, num_sources: int = 1, backend: str = "auto", strategy: str = "row_chunks",
                 fused: Optional[bool] = None):
        super().__init__()
        self.lm = lm
        self.num_sources = num_sources
        self.fused = fused_loss_supported(lm) if fused is None else fused
        self.last_layer = LastLayerRows()
        if self.fused:  # the head stays lm's submodule only: one module path, unchanged state_dict keys
            install_fused_head(lm, num_sources=num_sources, backend=backend, strategy=strategy)

    def forward(self, input_ids, labels=None, attention_mask=None, position_ids=None, source_index=None,
                targets=None):
        """Per-source (sum of response-token CE, response-token count) of one micro-batch.

        The keyword arguments are MicroBatch.model_inputs() (data_pipeline/schedule/batch.py); labels are
        unshifted and shifted here, once. A sequence shard brings its targets shifted already.
        """
        if targets is None:
            targets = shift_labels(labels)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        with self.last_layer.only(targets):
            if not self.fused:
                return hf_path_loss_sums(self.lm, targets, source_index, self.num_sources, **inputs)
            body = self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else self.lm.base_model
            hidden = body(**inputs, use_cache=False).last_hidden_state
        return self.lm.get_output_embeddings()(hidden, targets, source_index)  # FusedLMHead.forward
