"""Masked linear cross-entropy in vocabulary blocks: dW written once, in the model dtype.

The row-chunk algorithm (masked_linear_ce.py) reads W once per chunk of rows and must keep an
fp32 dW accumulator [V, d] across chunks, twice the size of a bf16 dW. This one loops over blocks
of vocabulary columns instead, each block seeing every kept row at once:
  pass 1: logits block [K, Vb] = H W_b^T (fp32), folded into a running max and sum of exp per row
          (online log-sum-exp) and the target logits -> per-row loss. No gradient yet.
  pass 2: the block's logits again, turned into softmax - onehot with the final max and sum; then
          dW_b = G_b^T H is complete in one product (fp32 accumulation inside the matmul, written
          once in the model dtype), and dH += G_b W_b accumulates into an fp32 [K, d] buffer,
          which is small (K rows, not V).
Cost: four products of K x d x V instead of three (the logits are computed twice). What it buys:
no fp32 [V, d] buffer and no final dW conversion, so the extra memory is a logits block plus
[K, d] buffers. Only the rows with a target reach any product, as in the row-chunk algorithm.
"""

from __future__ import annotations

from typing import Optional

import torch

from engine.kernels.contract import ChunkedResult, NeededGrads
from engine.kernels.mixed_precision_matmul import addmm_fp32_, matmul_operand, mm_fp32_into

# Size of the fp32 logits block: on CUDA a fixed budget (each block is a [K, Vb] GEMM, large
# enough at this size to keep the GPU busy), on CPU at least the row-chunk minimum.
CUDA_BLOCK_LOGITS_BYTES = 128 * 2**20
CPU_BLOCK_LOGITS_BYTES = 32 * 2**20
BLOCK_COLUMN_MULTIPLE = 128


def default_block_columns(n_kept: int, vocab_size: int, device: torch.device) -> int:
    """Vocabulary columns per block so that one fp32 [K, Vb] block fits the device's budget."""
    budget = CUDA_BLOCK_LOGITS_BYTES if device.type == "cuda" else CPU_BLOCK_LOGITS_BYTES
    columns = max(1, budget // (4 * max(1, n_kept)))
    if columns >= BLOCK_COLUMN_MULTIPLE:
        columns -= columns % BLOCK_COLUMN_MULTIPLE
    return min(columns, vocab_size)


def _block_logits(storage, hidden_kept, weight_operand, bias_fp32, start, stop) -> torch.Tensor:
    """fp32 logits [K, stop - start] of one vocabulary block, written into `storage`."""
    columns = stop - start
    logits = storage[: hidden_kept.shape[0] * columns].view(hidden_kept.shape[0], columns)
    mm_fp32_into(hidden_kept, weight_operand[start:stop].T, out=logits)
    if bias_fp32 is not None:
        logits.add_(bias_fp32[start:stop])
    return logits


def vocab_blocked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    kept_rows: torch.Tensor,
    kept_labels: torch.Tensor,
    block_columns: int,
    needed: NeededGrads,
) -> ChunkedResult:
    """Per kept row loss and the unscaled gradients of their sum (module docstring)."""
    device, n_kept, vocab = hidden.device, kept_rows.numel(), weight.shape[0]
    weight_operand = matmul_operand(weight)
    bias_fp32 = None if bias is None else bias.float()
    hidden_kept = hidden.index_select(0, kept_rows).to(weight_operand.dtype)
    storage = torch.empty(n_kept * min(block_columns, vocab), dtype=torch.float32, device=device)
    row_max = torch.full((n_kept,), float("-inf"), dtype=torch.float32, device=device)
    sum_exp = torch.zeros(n_kept, dtype=torch.float32, device=device)
    target_logits = torch.zeros(n_kept, dtype=torch.float32, device=device)
    blocks = [(start, min(start + block_columns, vocab)) for start in range(0, vocab, block_columns)] if n_kept else []

    for start, stop in blocks:
        logits = _block_logits(storage, hidden_kept, weight_operand, bias_fp32, start, stop)
        in_block = (kept_labels >= start) & (kept_labels < stop)
        column = (kept_labels - start).clamp_(0, stop - start - 1).unsqueeze(1)
        target_logits = torch.where(in_block, logits.gather(1, column).squeeze(1), target_logits)
        new_max = torch.maximum(row_max, logits.amax(dim=1))
        # exp(old max - new max) rescales the running sum; 0 on the first block (exp(-inf)).
        sum_exp.mul_(torch.exp(row_max - new_max)).add_(logits.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1))
        row_max = new_max
    row_losses = row_max + sum_exp.log() - target_logits if n_kept else sum_exp

    grad_hidden_kept = torch.zeros(n_kept, hidden.shape[1], dtype=torch.float32, device=device) if needed.hidden else None
    grad_weight = torch.empty_like(weight) if needed.weight else None
    grad_bias = torch.empty(vocab, dtype=bias.dtype, device=device) if needed.bias else None
    if not blocks:
        for grad in (grad_weight, grad_bias):
            if grad is not None:
                grad.zero_()
    inverse_sum = sum_exp.reciprocal().unsqueeze(1)
    kept_positions = torch.arange(n_kept, device=device)
    for start, stop in blocks if needed.any else []:
        logits = _block_logits(storage, hidden_kept, weight_operand, bias_fp32, start, stop)
        # exp(x - max) / sum rather than exp(x - lse): exact near the maximum even for logits ~1e4.
        grad_logits = logits.sub_(row_max.unsqueeze(1)).exp_().mul_(inverse_sum)
        in_block = (kept_labels >= start) & (kept_labels < stop)
        grad_logits.index_put_(
            (kept_positions[in_block], kept_labels[in_block] - start),
            torch.tensor(-1.0, device=device),
            accumulate=True,
        )
        grad_operand = grad_logits.to(weight_operand.dtype)
        if grad_weight is not None:
            if weight_operand.dtype == weight.dtype:
                torch.mm(grad_operand.T, hidden_kept, out=grad_weight[start:stop])
            else:  # half weight on CPU: fp32 product, rounded once into the model dtype
                grad_weight[start:stop].copy_(torch.mm(grad_operand.T, hidden_kept))
        if grad_hidden_kept is not None:
            addmm_fp32_(grad_hidden_kept, grad_operand, weight_operand[start:stop])
        if grad_bias is not None:
            grad_bias[start:stop].copy_(grad_logits.sum(dim=0))

    grad_hidden = None
    if grad_hidden_kept is not None:
        grad_hidden = torch.zeros_like(hidden)
        grad_hidden.index_copy_(0, kept_rows, grad_hidden_kept.to(hidden.dtype))
    return ChunkedResult(row_losses=row_losses, grad_hidden=grad_hidden, grad_weight=grad_weight, grad_bias=grad_bias)
