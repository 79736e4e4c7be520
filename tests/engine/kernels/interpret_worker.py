"""Runs fused cross-entropy cases on the Triton backend under the CPU interpreter; prints JSON.

Triton decides at import whether it interprets, so this runs in its own process with
TRITON_INTERPRET=1 set before anything imports Triton. Input on stdin: JSON {"cases": [Case fields],
"row_kernel": [[rows, vocab], ...]}. Output on stdout's last line: JSON {"cases": [measure_case
result per case], "row_kernel": [{layout: errors} per shape]}.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from engine.kernels.row_cross_entropy_torch import row_cross_entropy_torch_  # noqa: E402
from engine.kernels.row_cross_entropy_triton import row_cross_entropy_triton_  # noqa: E402
from tests.engine.kernels.cases import Case, measure_case, relative_error  # noqa: E402


def compare_row_kernels(rows: int, vocab: int) -> dict[str, dict[str, float]]:
    """Triton vs torch row kernel on row-major (GPU) and vocab-major (CPU) logits layouts.

    The end-to-end cases only see the CPU layout, so the GPU one is checked here directly.
    """
    generator = torch.Generator().manual_seed(rows * vocab)
    logits = 30 * torch.randn(rows, vocab, generator=generator)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    layouts = {"row_major": logits.clone(), "vocab_major": logits.T.contiguous().T}
    result = {}
    for layout, triton_logits in layouts.items():
        torch_logits = logits.clone()
        expected_loss = row_cross_entropy_torch_(torch_logits, labels, True)
        loss = row_cross_entropy_triton_(triton_logits, labels, True)
        result[layout] = {
            "loss": relative_error(loss, expected_loss),
            "grad": relative_error(triton_logits, torch_logits),
        }
    return result


def main() -> None:
    torch.set_num_threads(1)
    request = json.loads(sys.stdin.read())
    cases = [Case(**fields) for fields in request["cases"]]
    print(
        json.dumps(
            {
                "cases": [measure_case(case, "triton") for case in cases],
                "row_kernel": [compare_row_kernels(rows, vocab) for rows, vocab in request["row_kernel"]],
            }
        )
    )


if __name__ == "__main__":
    main()
