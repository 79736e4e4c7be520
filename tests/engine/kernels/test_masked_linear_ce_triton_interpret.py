"""The Triton backend, run on CPU through TRITON_INTERPRET=1 in a subprocess, against float64.

Interpreter time grows with rows x vocab blocks, so shapes here are small; one subprocess runs
every case and each test checks its own case's result.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.kernels.cases import TOLERANCE, Case

REPO_ROOT = Path(__file__).resolve().parents[3]
WORKER_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

CASES = (
    [
        Case(dtype, rows, vocab, masked, bias)
        for dtype, (rows, vocab), masked, bias in itertools.product(
            ("float32", "bfloat16"), ((1, 6400), (13, 5003), (9, 32000)), (0.0, 0.5), (False, True)
        )
    ]
    + [Case(dtype, 13, 6401, 1.0, True) for dtype in ("float32", "bfloat16")]
    + [Case(dtype, 13, 5003, 0.5, True, max_logit=1e4) for dtype in ("float32", "bfloat16")]
    + [Case("float32", 13, 6401, 0.0, False, chunk_size=4)]
)
ROW_KERNEL_SHAPES = ((1, 5003), (7, 32000))


@pytest.fixture(scope="module")
def interpreted_results() -> dict:
    environment = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run(
        [sys.executable, "-m", "tests.engine.kernels.interpret_worker"],
        input=json.dumps(
            {"cases": [dataclasses.asdict(case) for case in CASES], "row_kernel": ROW_KERNEL_SHAPES}
        ),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=environment,
        timeout=WORKER_TIMEOUT_S,
    )
    assert completed.returncode == 0, f"interpreter worker failed:\n{completed.stderr[-4000:]}"
    output = json.loads(completed.stdout.strip().splitlines()[-1])
    return {"cases": dict(zip(CASES, output["cases"])), "row_kernel": dict(zip(ROW_KERNEL_SHAPES, output["row_kernel"]))}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_triton_matches_float64_reference(case: Case, interpreted_results: dict) -> None:
    result = interpreted_results["cases"][case]
    tolerance = TOLERANCE[case.dtype]
    too_large = {name: error for name, error in result["errors"].items() if not error <= tolerance}
    assert not too_large, f"{case.name}: relative errors above {tolerance}: {too_large}"
    assert result["n_target"] == result["expected_n_target"]
    assert result["grads_finite"] and result["grad_dtypes_match"]
    if case.masked == 1.0:
        assert result["loss"] == 0.0 and result["n_target"] == 0 and result["grads_all_zero"]


@pytest.mark.parametrize("shape", ROW_KERNEL_SHAPES, ids=str)
def test_triton_row_kernel_matches_torch_in_both_logits_layouts(shape: tuple[int, int], interpreted_results: dict) -> None:
    for layout, errors in interpreted_results["row_kernel"][shape].items():
        assert max(errors.values()) <= TOLERANCE["float32"], f"{layout}: {errors}"
