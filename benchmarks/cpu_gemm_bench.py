"""float32 GEMM on CPU: the default BLAS (torch.mm) against gemm.cpp's oneDNN products, side by side.

    OMP_NUM_THREADS=1 python3 benchmarks/cpu_gemm_bench.py [--tokens 2000] [--repeats 30]

The shapes are those of one micro-batch of the peer_bench model (hidden 256, intermediate 688,
vocab 6400, ~2000 tokens, loss chunks of 560 rows): each projection's forward, dX and dW product
and the fused loss's logits, dH and dW. The two sides alternate call by call so that drifting load
hits both; each line prints the median GFLOP/s of each and the median of the per-round ratios
(min-max). The loss's dH product is measured but stays on the BLAS in training (oneDNN reads
the transposed vocab-major buffer slowly). A new token count per round makes oneDNN meet the shapes training gives it. Ends with
`cpu_gemm onednn_over_blas=<median over shapes>`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.kernels.cpu.extension import load_body_ops  # noqa: E402
from engine.kernels.cpu import linear  # noqa: E402
from engine.kernels.cpu.linear import COLUMNS, INNER, ROWS, gemm_into  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB, CHUNK = 256, 688, 6400, 560


def products(tokens: int) -> list:
    """(name, a, b, varying) of one micro-batch with `tokens` tokens."""
    x, h = torch.randn(tokens, HIDDEN), torch.randn(tokens, INTERMEDIATE)
    w_in, w_up, w_down = torch.randn(HIDDEN, HIDDEN), torch.randn(INTERMEDIATE, HIDDEN), torch.randn(HIDDEN, INTERMEDIATE)
    lm, rows = torch.randn(VOCAB, HIDDEN), torch.randn(CHUNK + tokens % 64, HIDDEN)
    logits = torch.randn(VOCAB, rows.shape[0])
    return [
        ("q/k/v/o forward", x, w_in.t(), ROWS), ("gate/up forward", x, w_up.t(), ROWS),
        ("down forward", h, w_down.t(), ROWS), ("gate/up dX", h, w_up, ROWS), ("down dX", x, w_down, ROWS),
        ("q/k/v/o dW", x.t(), x, INNER), ("gate/up dW", h.t(), x, INNER), ("down dW", x.t(), h, INNER),
        ("loss logits", lm, rows.t(), COLUMNS), ("loss dH", logits.t(), lm, ROWS), ("loss dW", logits, rows, INNER),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2000, help="tokens of the first round (+1 every round)")
    p.add_argument("--repeats", type=int, default=30, help="rounds")
    args = p.parse_args()
    ops = load_body_ops(print)
    if ops is None:
        sys.exit("the CPU ops are unavailable")
    if not linear.available():
        sys.exit(f"oneDNN float32 products are unavailable here: {linear.unavailable_reason()}")
    rates = {}
    for r in range(args.repeats):
        for name, a, b, varying in products(args.tokens + r):
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
            out = torch.empty(a.shape[0], b.shape[1])
            sides = [("blas", lambda: torch.mm(a, b, out=out)), ("onednn", lambda: gemm_into(out, a, b, 0.0, varying, ops))]
            for side, run in sides if r % 2 == 0 else sides[::-1]:
                start = time.perf_counter()
                run()
                rates.setdefault(name, {}).setdefault(side, []).append(flops / (time.perf_counter() - start) / 1e9)
    print(f"{'product':<18}{'BLAS GFLOP/s':>13}{'oneDNN GFLOP/s':>16}  oneDNN/BLAS median (min-max)")
    medians = []
    for name, side in rates.items():
        ratios = [o / b for o, b in zip(side["onednn"], side["blas"])]
        medians.append(statistics.median(ratios))
        print(f"{name:<18}{statistics.median(side['blas']):>13.1f}{statistics.median(side['onednn']):>16.1f}"
              f"  {medians[-1]:.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
    print(f"cpu_gemm onednn_over_blas={statistics.median(medians):.3f}")


if __name__ == "__main__":
    main()
