"""The SFT loss: response tokens only, normalised by the global count of response tokens.

Invariant 1 of DESIGN.md: the gradient of one optimizer step equals the gradient of
    (sum of per-token CE over all response tokens in the global batch) / (their global count)
whatever the split into micro-batches, accumulation steps and ranks. The usual per-micro-batch
mean gets this wrong whenever micro-batches hold different numbers of response tokens: a token
in a micro-batch with few response tokens then weighs more than one in a crowded micro-batch.
So the trainer counts the step's response tokens on every rank first, all-reduces the count once,
and each micro-batch contributes loss_sum / global_count, pre-multiplied to undo DeepSpeed's own
1/accumulation scaling and its mean over data-parallel ranks.

Shifting labels for next-token prediction happens here and only here (`shift_labels`).

The loss never materialises [tokens, vocab] logits: the model body produces hidden states and the
lm_head's weight goes into the fused masked linear cross-entropy (engine/kernels), which drops
prompt rows before any matmul. Under ZeRO-3 the lm_head weight is partitioned; DeepSpeed gathers a
module's parameters in its forward pre-hook, so the fused loss runs *as the lm_head module's
forward* (see `install_fused_head`), and DeepSpeed gathers, reduces and re-partitions as usual.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F

from engine.kernels import masked_linear_cross_entropy, masked_linear_cross_entropy_by_group

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets aligned with the positions that predict them: out[..., t] = labels[..., t + 1].

    The last position predicts nothing (ignore_index). Packed rows need no special case: the
    data pipeline sets the first token of every packed sample to ignore_index, so the last token
    of one sample never learns to predict the next sample.
    """
    out = torch.full_like(labels, ignore_index)
    out[..., :-1] = labels[..., 1:]
    return out


def count_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Response tokens that will be trained in a micro-batch (after the shift)."""
    return int((labels[..., 1:] != ignore_index).sum())


def _fused_head_forward(self, hidden, labels=None, source_index=None, num_sources: int = 1, backend="auto",
                        strategy="row_chunks"):
    """Replacement forward of the lm_head Linear. With labels: per-source (loss_sums, counts).
    Without: the original logits, so generation keeps working."""
    if labels is None:
        return self._zhiling_original_forward(hidden)
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if num_sources == 1 or source_index is None:
        loss, n = masked_linear_cross_entropy(h, self.weight, y, bias=self.bias, backend=backend, strategy=strategy)
        return loss.reshape(1), n.reshape(1)
    # One pass over all sources' rows, split by source inside the kernel: the cost and memory of
    # the single-source call (a call per source would read W three times and hold a dW each).
    return masked_linear_cross_entropy_by_group(
        h, self.weight, y, source_index.reshape(-1), num_sources, bias=self.bias, backend=backend, strategy=strategy
    )


def install_fused_head(model) -> torch.nn.Module:
    """Make the model's output-embedding module compute the fused loss when given labels."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(model).__name__}: the fused loss needs a Linear lm_head")
    if not hasattr(head, "_zhiling_original_forward"):
        head._zhiling_original_forward = head.forward
        head.forward = types.MethodType(_fused_head_forward, head)
    return head


_UNSUPPORTED_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def fused_loss_supported(model) -> bool:
    """Models that transform logits after the lm_head (soft-capping, scaling) need the HF path."""
    cfg = model.config
    return not any(getattr(cfg, k, None) not in (None, 1.0) for k in _UNSUPPORTED_LOGIT_TRANSFORMS)


def micro_batch_loss_sums(model, batch: dict, *, num_sources: int, fused: bool, backend: str = "auto",
                          strategy: str = "row_chunks"):
    """Per-source (sum of response-token CE, response-token count) of one micro-batch.

    batch: input_ids, labels (unshifted), optional attention_mask, position_ids, source_index.
    """
    targets = shift_labels(batch["labels"])
    source_index = batch.get("source_index")
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if batch.get(k) is not None}
    if fused:
        body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        hidden = body(**model_inputs, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        return head(hidden, labels=targets, source_index=source_index, num_sources=num_sources, backend=backend,
                    strategy=strategy)
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
    data-parallel ranks, so both factors are multiplied back in here.
    """
    return loss_sum * (world_size * grad_accum / max(global_count, 1))


class CausalLMWithMaskedLoss(torch.nn.Module):
    """The module DeepSpeed wraps: a HF causal LM whose forward returns per-source loss sums.

    Going through one module forward keeps DeepSpeed's engine bookkeeping (ZeRO-3 parameter
    fetching, hooks) intact; `.lm` is the plain HF model for generation and export.
    """

    def __init__(self, lm, *, num_sources: int = 1, backend: str = "auto", strategy: str = "row_chunks",
                 fused: Optional[bool] = None):
        super().__init__()
        self.lm = lm
        self.num_sources = num_sources
        self.backend = backend
        self.strategy = strategy
        self.fused = fused_loss_supported(lm) if fused is None else fused
        if self.fused:
            install_fused_head(lm)

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, source_index=None):
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                 "position_ids": position_ids, "source_index": source_index}
        return micro_batch_loss_sums(self.lm, batch, num_sources=self.num_sources, fused=self.fused,
                                     backend=self.backend, strategy=self.strategy)
