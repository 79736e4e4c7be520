"""Matrix products that produce or accumulate float32 whatever the (16- or 32-bit) input dtype.

The fused cross-entropy needs three products per chunk of rows: logits = H W^T (must be fp32 so the
log-sum-exp is accurate), dH = G W and dW += G^T H (dW accumulates over chunks, so it must stay in
fp32 for bf16/fp16 models). CUDA offers fp32 output for half inputs natively (`out_dtype`), so the
weight is used as is. CPU kernels do not, so on CPU a half weight is upcast once per call into an
fp32 operand (one extra V x d fp32 buffer, acceptable for the fallback path).

Accumulating a half product into an fp32 buffer (cuBLAS: C fp32 read with beta=1, A and B half) is
reached through torch.baddbmm(..., out_dtype=float32) on a batch of one: the addmm overload with
out_dtype requires C in the input dtype in current PyTorch releases. Each way is probed on first
use and the next one taken when it is refused, ending with row slices of an fp32 product added
into the accumulator (correct everywhere, one extra bounded temporary).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)
SUPPORTED_DTYPES = (torch.float32,) + HALF_DTYPES

# Largest fp32 temporary of the row-slice fallback, in elements (256 MiB).
ROW_SLICE_TEMPORARY_ELEMENTS = 64 * 2**20


def matmul_operand(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in the dtype the products will read it in (fp32 copy only for half on CPU)."""
    if tensor.dtype in HALF_DTYPES and not tensor.is_cuda:
        return tensor.float()
    return tensor


def mm_fp32_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out := a @ b, out being float32 and a, b sharing a dtype from matmul_operand."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def _accumulate_by_baddbmm(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    batch_of_one = accumulator.unsqueeze(0)
    torch.baddbmm(batch_of_one, a.unsqueeze(0), b.unsqueeze(0), out_dtype=torch.float32, out=batch_of_one)


def _accumulate_by_addmm(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    torch.addmm(accumulator, a, b, out_dtype=torch.float32, out=accumulator)


def _accumulate_in_row_slices(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Add fp32 products of row slices of a; the temporary stays under ROW_SLICE_TEMPORARY_ELEMENTS."""
    slice_rows = max(1, ROW_SLICE_TEMPORARY_ELEMENTS // max(1, b.shape[1]))
    b_operand = b if b.is_cuda else b.float()  # CPU kernels have no half-in, fp32-out product
    for start in range(0, a.shape[0], slice_rows):
        stop = start + slice_rows
        if a.is_cuda:
            accumulator[start:stop].add_(torch.mm(a[start:stop], b_operand, out_dtype=torch.float32))
        else:
            accumulator[start:stop].addmm_(a[start:stop].float(), b_operand)


# Ways to accumulate a half product into fp32, in order of preference; a way that raises once is
# dropped for the rest of the process (with a warning), the last one always works.
_HALF_ACCUMULATE_WAYS: list[tuple[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]]] = [
    ("baddbmm with out_dtype=float32", _accumulate_by_baddbmm),
    ("addmm with out_dtype=float32", _accumulate_by_addmm),
    ("row slices of fp32 products", _accumulate_in_row_slices),
]


def addmm_fp32_(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """accumulator += a @ b in place, accumulator being float32 and a, b sharing a dtype."""
    if a.dtype == torch.float32:
        accumulator.addmm_(a, b)
        return
    while len(_HALF_ACCUMULATE_WAYS) > 1:
        name, accumulate = _HALF_ACCUMULATE_WAYS[0]
        try:
            accumulate(accumulator, a, b)
            return
        except RuntimeError as error:  # refused before any write: the accumulator is untouched
            _HALF_ACCUMULATE_WAYS.pop(0)
            warnings.warn(f"fp32 accumulation by {name} unavailable ({str(error).splitlines()[0]}); "
                          f"trying {_HALF_ACCUMULATE_WAYS[0][0]}")
    _HALF_ACCUMULATE_WAYS[0][1](accumulator, a, b)
