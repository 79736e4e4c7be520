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
