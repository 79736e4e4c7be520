"""Fused masked linear cross-entropy: sum of CE(hidden @ weight^T + bias, labels) over target rows.

Algorithm (forward computes the gradients too, as Liger-Kernel does):
  1. Rows whose label is ignore_index (prompt, padding) are dropped before any matmul: only kept
     row indices are carried, and each chunk gathers its rows with index_select.
  2. Kept rows are processed in chunks of `chunk_rows`. For each chunk, one fp32 [rows, V] logits
     buffer is formed, reduced to the per-row loss, and turned in place into softmax - onehot
     (on CPU by one C++ kernel, kernels/cpu/vocab_major_ce.py, when the CPU ops are loaded).
  3. That buffer immediately yields the chunk's dH rows (scattered into a zero [N, d]) and is
     accumulated into a float32 dW (and dB), which the first chunk's product initialises; the next
     chunk reuses the buffer. No [N, V] or [kept, V] tensor ever exists.
  4. The per-row losses are summed, or summed per row group (data source) for
     masked_linear_cross_entropy_by_group; backward only scales the stored gradients.
Computing gradients in forward costs 3 matmuls of kept x d x V; saving the log-sum-exp and
recomputing the logits in backward would cost 4 (a third more of the dominant work), so gradients
are formed in forward. When no input needs a gradient (evaluation, torch.no_grad) only the loss is
computed, with no gradient buffers. strategy="vocab_blocks" runs the other algorithm
(vocab_blocked_ce.py) behind the same interface: one more product, no fp32 [V, d] accumulator.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from engine.kernels.contract import (ChunkedResult, KernelArgumentError, NeededGrads, check_arguments, kept_groups_of,
                                     resolve_backend, select_kept_rows)
from engine.kernels.mixed_precision_matmul import addmm_fp32_, matmul_operand, mm_fp32_into
from engine.kernels.cpu.extension import loaded_body_ops
from engine.kernels.cpu.linear import COLUMNS, INNER, available, gemm_into
from engine.kernels.cpu.vocab_major_ce import vocab_major_cross_entropy_
from engine.kernels.row_cross_entropy_torch import row_cross_entropy_torch_
from engine.kernels.vocab_blocked_ce import default_block_columns, vocab_blocked_cross_entropy

RowCrossEntropy = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]

# Size of the per-chunk fp32 logits buffer. On CPU it is a share of the gradient buffers dW + dH
# that any method must return, so that the extra memory stays within 1.25x of them: the buffer
# takes at most 22% and the rest of the loop (hidden/dH chunk rows, the row-max fold block, BLAS
# workspace) about 1-2% more (benchmarks/RESULTS.md, kernel_bench, has the measured peak). Bigger
# chunks are faster: each chunk streams W twice, read-modify-writes all of dW and pays a thread
# wake-up per parallel op. Small shapes get at least the minimum so that they are
# not cut into many tiny chunks. On GPU bigger chunks mean fewer read-modify-write passes over the
# fp32 dW; for bf16 a half-size bf16 copy of the chunk's gradient comes on top.
CPU_LOGITS_SHARE_OF_GRADIENTS = 0.22
CPU_MIN_CHUNK_LOGITS_BYTES = 16 * 2**20
CUDA_CHUNK_LOGITS_BYTES = 1 * 2**30
CHUNK_ROW_MULTIPLE = 16
STRATEGIES = ("row_chunks", "vocab_blocks")


def default_chunk_rows(n_rows: int, hidden_size: int, vocab_size: int, device: torch.device) -> int:
    """Rows per chunk so that one fp32 [rows, V] buffer fits the device's budget.

    On CPU the budget is CPU_LOGITS_SHARE_OF_GRADIENTS of the fp32 gradient buffers dW [V, d] and
    dH [N, d] (at least CPU_MIN_CHUNK_LOGITS_BYTES); on CUDA a fixed CUDA_CHUNK_LOGITS_BYTES.
    """
    if device.type == "cuda":
        budget = CUDA_CHUNK_LOGITS_BYTES
    else:
        gradient_bytes = 4 * (vocab_size + n_rows) * hidden_size
        budget = max(CPU_MIN_CHUNK_LOGITS_BYTES, int(CPU_LOGITS_SHARE_OF_GRADIENTS * gradient_bytes))
    rows = max(1, budget // (4 * vocab_size))
    return rows if rows < CHUNK_ROW_MULTIPLE else rows - rows % CHUNK_ROW_MULTIPLE


def balanced_chunk_rows(n_kept: int, max_rows: int) -> int:
    """Rows per chunk for n_kept rows in as few chunks as max_rows allows, the chunks of equal size.

    Same number of chunks (passes over W and dW) as max_rows, but the logits buffer shrinks to what
    the chunks use (2048 kept rows at 240 max: 9 chunks of 232, not 8 of 240 and one of 128), and
    no tiny last chunk runs at poor matmul efficiency. Rounded up to a multiple of 8 (rows are the
    contiguous axis of the CPU buffer: 32-byte aligned vocab rows) while that stays <= max_rows.
    """
    if n_kept <= max_rows:
        return max(1, n_kept)
    n_chunks = -(-n_kept // max_rows)
    rows = -(-n_kept // n_chunks)
    rounded = -(-rows // 8) * 8
    return rounded if rounded <= max_rows else rows


def row_cross_entropy_for(backend: str, device: torch.device) -> RowCrossEntropy:
    """The per-chunk loss/gradient step of `backend` ("torch" or "triton") on `device`: for torch on
    CPU the C++ kernel (kernels/cpu/vocab_major_ce.py) when this process loaded the CPU ops."""
    if backend == "triton":
        # Imported here so that torch-only use never imports Triton (its interpreter mode is
        # fixed at first import).
        from engine.kernels.row_cross_entropy_triton import row_cross_entropy_triton_

        return row_cross_entropy_triton_
    ops = loaded_body_ops() if device.type == "cpu" else None
    if ops is not None:
        return functools.partial(vocab_major_cross_entropy_, ops=ops)
    return row_cross_entropy_torch_


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    kept_rows: torch.Tensor,
    kept_labels: torch.Tensor,
    chunk_rows: int,
    needed: NeededGrads,
    row_cross_entropy_: RowCrossEntropy,
) -> ChunkedResult:
    """Steps 2-3 of the module docstring over the kept rows."""
    weight_operand = matmul_operand(weight)
    bias_fp32 = None if bias is None else bias.float()
    row_losses = torch.empty(kept_rows.numel(), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if needed.hidden else None
    # dW is written by the first chunk's product (no zero fill: a full V x d pass saved) and
    # accumulated by the others; zeroed only when no row has a target.
    grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if needed.weight else None
    if grad_weight is not None and kept_rows.numel() == 0:
        grad_weight.zero_()
    grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if needed.bias else None
    # One logits buffer reused by every chunk: a fresh 16 MiB+ block per chunk fragments the CPU
    # heap (measured +17% peak extra RSS) and costs page faults.
    logits_storage = torch.empty(
        min(chunk_rows, kept_rows.numel()) * weight.shape[0], dtype=torch.float32, device=hidden.device
    )
    onednn = onednn_ops_for(hidden, weight_operand)
    for start in range(0, kept_rows.numel(), chunk_rows):
        rows = kept_rows[start : start + chunk_rows]
        hidden_chunk = hidden.index_select(0, rows).to(weight_operand.dtype)
        logits = chunk_logits_into(logits_storage, hidden_chunk, weight_operand, onednn)
        if bias_fp32 is not None:
            logits.add_(bias_fp32)
        row_losses[start : start + chunk_rows] = row_cross_entropy_(
            logits, kept_labels[start : start + chunk_rows], needed.any
        )
        if not needed.any:
            continue
        grad_logits = logits.to(weight_operand.dtype)
        if grad_hidden is not None:
            # the default BLAS: oneDNN reads the vocab-major buffer's transpose slowly (cpu_gemm_bench)
            grad_hidden.index_copy_(0, rows, torch.mm(grad_logits, weight_operand).to(hidden.dtype))
        if grad_weight is not None:
            if onednn is not None:
                gemm_into(grad_weight, grad_logits.T, hidden_chunk, 0.0 if start == 0 else 1.0, INNER, onednn)
            elif start == 0:
                mm_fp32_into(grad_logits.T, hidden_chunk, out=grad_weight)
            else:
                addmm_fp32_(grad_weight, grad_logits.T, hidden_chunk)
        if grad_bias is not None:
            grad_bias += logits.sum(dim=0)
    return ChunkedResult(
        row_losses=row_losses,
        grad_hidden=grad_hidden,
        grad_weight=None if grad_weight is None else grad_weight.to(weight.dtype),
        grad_bias=None if grad_bias is None else grad_bias.to(bias.dtype),
    )


def onednn_ops_for(hidden: torch.Tensor, weight_operand: torch.Tensor):
    """The CPU ops of engine/kernels/cpu when this process loaded them (model.fused_layers) and the
    products are float32 on CPU: the logits and dW products then run on oneDNN (kernels/cpu/linear.py)."""
    if hidden.is_cuda or hidden.dtype != torch.float32 or weight_operand.dtype != torch.float32 or not available():
        return None
    return loaded_body_ops()


def chunk_logits_into(storage: torch.Tensor, hidden_chunk: torch.Tensor, weight_operand: torch.Tensor,
                      onednn=None) -> torch.Tensor:
    """fp32 logits [rows, V] of the chunk, written into the front of `storage`.

    On CPU the logits are laid out vocab-major (a [rows, V] view of a contiguous [V, rows]
    block): the CPU matmul into a row-major [rows, V] output allocates a second output-sized
    temporary (measured), the vocab-major product W H^T does not, and the dH and dW products then
    read it without copies either. On CUDA row-major keeps the Triton kernel's row reads coalesced.
    """
    rows, vocab = hidden_chunk.shape[0], weight_operand.shape[0]
    if hidden_chunk.is_cuda:
        return mm_fp32_into(hidden_chunk, weight_operand.T, out=storage[: rows * vocab].view(rows, vocab))
    out = storage[: rows * vocab].view(vocab, rows)
    if onednn is not None:
        return gemm_into(out, weight_operand, hidden_chunk.T, 0.0, COLUMNS, onednn).T
    vocab_major = mm_fp32_into(weight_operand, hidden_chunk.T, out=out)
    return vocab_major.T


class _MaskedLinearCrossEntropy(torch.autograd.Function):
    """Autograd wrapper: forward runs the chunk loop and returns per-group loss sums [G]; backward
    scales the gradients it formed.

    The gradients are formed in forward for the sum of all rows, so backward can only scale them:
    every group's loss sum must get the same upstream gradient (the loss that is differentiated
    is their plain sum, times any factor). Anything else raises rather than return a wrong gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, kept_rows, kept_labels, kept_groups, num_groups, plan):
        if plan.strategy == "vocab_blocks":
            result = vocab_blocked_cross_entropy(hidden, weight, bias, kept_rows, kept_labels, plan.chunk, plan.needed)
        else:
            result = chunked_cross_entropy(
                hidden, weight, bias, kept_rows, kept_labels, plan.chunk, plan.needed,
                row_cross_entropy_for(plan.backend, hidden.device),
            )
        ctx.grads = (result.grad_hidden, result.grad_weight, result.grad_bias)
        if kept_groups is None:
            return result.row_losses.sum().reshape(1)
        group_sums = torch.zeros(num_groups, dtype=torch.float32, device=hidden.device)
        return group_sums.index_add_(0, kept_groups, result.row_losses)

    @staticmethod
    def backward(ctx, grad_group_sums):
        if ctx.grads is None:
            raise RuntimeError(
                "masked_linear_cross_entropy: backward ran twice; its gradients are scaled in place "
                "and freed after the first backward (retain_graph is not supported)"
            )
        scale = grad_group_sums[:1]
        if grad_group_sums.numel() > 1 and not torch.equal(grad_group_sums, scale.expand_as(grad_group_sums)):
            raise RuntimeError(
                "masked_linear_cross_entropy_by_group: the per-group loss sums got different upstream "
                f"gradients {grad_group_sums.tolist()}; differentiate their plain sum (report the groups "
                "detached), since the gradients are formed in forward for the sum"
            )
        grads = [None if grad is None else grad.mul_(scale.to(grad.dtype)) for grad in ctx.grads]
        ctx.grads = None
        return grads[0], grads[1], grads[2], None, None, None, None, None


@dataclass(frozen=True)
class _Plan:
    """How one call runs: algorithm, its chunk (rows, or vocabulary columns), backend, gradients."""

    strategy: str
    chunk: int
    backend: str
    needed: NeededGrads


def _run(hidden, weight, labels, ignore_index, bias, chunk_size, backend, strategy, groups, num_groups) -> tuple:
    """Validate, drop the rows without a target, and run the autograd Function."""
    check_arguments(hidden, weight, labels, bias, chunk_size)
    if strategy not in STRATEGIES:
        raise KernelArgumentError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
    resolved_backend = resolve_backend(backend, hidden.device)
    kept_rows, kept_labels = select_kept_rows(labels, ignore_index, weight.shape[0])
    kept_groups = None if groups is None else kept_groups_of(groups, labels, kept_rows, num_groups)
    grad_enabled = torch.is_grad_enabled()
    needed = NeededGrads(
        hidden=grad_enabled and hidden.requires_grad,
        weight=grad_enabled and weight.requires_grad,
        bias=grad_enabled and bias is not None and bias.requires_grad,
    )
    if strategy == "vocab_blocks":
        chunk = chunk_size or default_block_columns(kept_rows.numel(), weight.shape[0], hidden.device)
    else:
        chunk = chunk_size or balanced_chunk_rows(
            kept_rows.numel(), default_chunk_rows(hidden.shape[0], hidden.shape[1], weight.shape[0], hidden.device)
        )
    plan = _Plan(strategy, chunk, resolved_backend, needed)
    loss_sums = _MaskedLinearCrossEntropy.apply(hidden, weight, bias, kept_rows, kept_labels, kept_groups, num_groups, plan)
    return loss_sums, kept_rows, kept_groups


def masked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    # -100 is data_pipeline/schedule/labels.py's IGNORE_INDEX, written out: the kernels import only torch/triton.
    ignore_index: int = -100,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    strategy: str = "row_chunks",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token CE over rows with a target, without ever forming [N, V] logits.

    hidden [N, d] and weight [V, d] (and bias [V]) share a dtype: float32, bfloat16 or float16.
    labels [N] are already aligned with the rows of hidden (row i predicts labels[i]); rows equal
    to ignore_index do not contribute and never reach the matmul. chunk_size is the number of kept
    rows per chunk (default: equal chunks no larger than a logits-memory budget allows). backend
    is "auto" (Triton on CUDA, torch otherwise), "torch" or "triton". strategy "row_chunks" (this
    module's algorithm: three products, an fp32 dW accumulator) or "vocab_blocks"
    (vocab_blocked_ce.py: four products, dW written once in the model dtype, the least memory;
    chunk_size is then the vocabulary columns per block, and the softmax runs as torch ops).

    Returns (loss_sum, n_target_tokens): a 0-dim float32 tensor with grad, and a 0-dim int64
    tensor. With no target rows both are 0 and every gradient is exactly 0.
    """
    loss_sums, kept_rows, _ = _run(hidden, weight, labels, ignore_index, bias, chunk_size, backend, strategy, None, 1)
    n_target_tokens = torch.tensor(kept_rows.numel(), dtype=torch.int64, device=hidden.device)
    return loss_sums.reshape(()), n_target_tokens


def masked_linear_cross_entropy_by_group(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    ignore_index: int = -100,  # data_pipeline/schedule/labels.py's IGNORE_INDEX (see above)
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    strategy: str = "row_chunks",
) -> tuple[torch.Tensor, torch.Tensor]:
    """masked_linear_cross_entropy with the loss and target count split by row group.

    groups [N] gives each row's group in [0, num_groups) (e.g. its data source; rows without a
    target may hold any id, such as -1 for padding). One pass over the kept rows of all groups:
    the cost of the ungrouped call, not num_groups calls (each would read W three times and hold
    its own dW). Returns (loss_sums [G] float32 with grad, counts [G]
    int64). Differentiate loss_sums.sum() (times any factor): the gradients are formed in forward
    for the sum, and backward refuses upstream gradients that differ between groups.
    """
    loss_sums, _, kept_groups = _run(
        hidden, weight, labels, ignore_index, bias, chunk_size, backend, strategy, groups, num_groups
    )
    counts = torch.bincount(kept_groups, minlength=num_groups)[:num_groups]
    return loss_sums, counts
