"""benchmarks/kernel_bench.py --quick runs end to end and ends with the summary line the docs quote."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
SUMMARY_LINE = re.compile(r"^kernel_bench cpu time_ratio=\d+\.\d{3} mem_ratio=\d+\.\d{3} mem_over_floor=\d+\.\d{3}$")


def test_quick_benchmark_prints_the_summary_line_last() -> None:
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "kernel_bench.py"), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    last_line = completed.stdout.strip().splitlines()[-1]
    assert SUMMARY_LINE.match(last_line), f"unexpected last line: {last_line!r}"


def _load_kernel_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernel_bench", REPO_ROOT / "benchmarks" / "kernel_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_ratio_line_compares_each_of_ours_with_the_others_that_ran() -> None:
    bench = _load_kernel_bench()
    results = {
        "naive": {"median_ms": 10.0, "peak_extra_bytes": 1000},
        "ours_triton": {"median_ms": 2.0, "peak_extra_bytes": 300},
        "ours_torch": {"median_ms": 3.0, "peak_extra_bytes": 300},
        "ours_vocab": {"median_ms": 4.0, "peak_extra_bytes": 100},
        "liger": {"median_ms": 5.0, "peak_extra_bytes": 500},
        "cce": {"error": "ImportError: not installed"},
    }
    assert bench.format_gpu_ratios(results, "ours_triton") == (
        "vs_naive: time=0.200 mem=0.300 | vs_liger: time=0.400 mem=0.600"
    )
    assert bench.format_gpu_ratios(results, "ours_vocab") == (
        "vs_naive: time=0.400 mem=0.100 | vs_liger: time=0.800 mem=0.200"
    )
    results["ours_vocab"] = {"error": "OutOfMemoryError"}
    assert bench.format_gpu_ratios(results, "ours_vocab") == "ours_vocab failed"
