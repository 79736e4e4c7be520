"""Matrix products that produce or accumulate float32 whatever the (16- or 32-bit) input dtype.

The fused cross-entropy needs three products per chunk of rows: logits = H W^T (must be fp32 so the
log-sum-exp is accurate), dH = G W and dW += G^T H (dW accumulates over chunks, so it must stay in
fp32 for bf16/fp16 models). CUDA offers fp32 output for half inputs natively (`out_dtype`), so the
weight is used as is. CPU kernels do not, so on CPU a half weight is upcast once per call into an
fp32 operand (one extra V x d fp32 buffer, acceptable for the fallback path).
"""

from __future__ import annotations

import warnings

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)
SUPPORTED_DTYPES = (torch.float32,) + HALF_DTYPES

# Whether torch.addmm(..., out_dtype=float32, out=acc) accepted half inputs; probed on first use.
_fused_half_addmm_works = True


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


def addmm_fp32_(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """accumulator += a @ b in place, accumulator being float32 and a, b sharing a dtype."""
    if a.dtype == torch.float32:
        accumulator.addmm_(a, b)
        return
    global _fused_half_addmm_works
    if _fused_half_addmm_works:
        try:
            # cuBLAS reads C in fp32 and adds the half product accumulated in fp32: no half
            # rounding of the partial sums and no V x d temporary.
            torch.addmm(accumulator, a, b, out_dtype=torch.float32, out=accumulator)
            return
        except RuntimeError as error:
            _fused_half_addmm_works = False
            warnings.warn(f"fp32-accumulating half addmm unavailable ({error}); using row slices")
    _addmm_fp32_in_row_slices_(accumulator, a, b)


def _addmm_fp32_in_row_slices_(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Fallback: add fp32 products of row slices of a, so the temporary stays as small as a."""
    slice_rows = max(1, a.numel() // max(1, b.shape[1]))
    for start in range(0, a.shape[0], slice_rows):
        stop = start + slice_rows
        accumulator[start:stop].add_(torch.mm(a[start:stop], b, out_dtype=torch.float32))
