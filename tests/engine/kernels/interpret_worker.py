"""Runs fused cross-entropy cases on the Triton backend under the CPU interpreter; prints JSON.

Triton decides at import whether it interprets, so this runs in its own process with
TRITON_INTERPRET=1 set before anything imports Triton. Input: a JSON list of Case fields on stdin.
Output: one JSON list of measure_case results (same order) on stdout's last line.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from tests.engine.kernels.cases import Case, measure_case  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    cases = [Case(**fields) for fields in json.loads(sys.stdin.read())]
    print(json.dumps([measure_case(case, "triton") for case in cases]))


if __name__ == "__main__":
    main()
