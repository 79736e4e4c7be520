"""Fused masked linear cross-entropy against the naive lm_head + F.cross_entropy, on CPU and GPU.

CPU (always): N=4096, d=1024, V=32000 fp32 with 0/50/80% prompt rows; naive, ours (the default
row_chunks strategy) and ours_vocab (vocab_blocks, for information). Each measurement runs in a
fresh subprocess (variants interleaved, repeated; medians), so that memory is the process's own:
peak extra memory = peak RSS (VmHWM, reset after one warm-up step at the measured shape) during the
timed steps - RSS just before them. Time is the wall time of forward + backward after that warm-up.

GPU (--gpu, needs CUDA): V=151936, d in {896, 4096}, N in {8192, 16384}, bf16, 0/50/80% prompt;
naive, ours (row_chunks with the Triton and torch backends, and vocab_blocks), Liger-Kernel and
Cut Cross-Entropy when installed.
Memory is torch.cuda.max_memory_allocated over the step minus memory allocated before it; time
from CUDA events, median over interleaved repeats.

    python benchmarks/kernel_bench.py [--quick] [--gpu | --gpu-only] [--repeats 3]

Unless --gpu-only, the last line is
    kernel_bench cpu time_ratio=<ours/naive> mem_ratio=<ours/naive> mem_over_floor=<ours/(dW+dH)>
at 50% prompt rows, dW + dH = (V*d + N*d) * 4 bytes being the gradient buffers any method needs.
On a GPU machine, benchmarks/gpu_kernels.sh runs the CUDA tests and the GPU part in one go.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data_pipeline.schedule.labels import IGNORE_INDEX  # noqa: E402
from engine.kernels import masked_linear_cross_entropy, reference_masked_linear_cross_entropy  # noqa: E402

PROMPT_FRACTIONS = (0.0, 0.5, 0.8)
SUMMARY_PROMPT_FRACTION = 0.5
GPU_VOCAB = 151936
GPU_HIDDEN_SIZES = (896, 4096)
GPU_ROWS = (8192, 16384)


@dataclass(frozen=True)
class Shape:
    rows: int
    hidden: int
    vocab: int


FULL_CPU_SHAPE = Shape(4096, 1024, 32000)
QUICK_CPU_SHAPE = Shape(256, 64, 2048)
GPU_CHECK_SHAPE = Shape(300, 128, GPU_VOCAB)
GPU_CHECK_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Measurement:
    """One subprocess run: seconds per forward+backward and peak extra bytes."""

    variant: str
    prompt_fraction: float
    seconds: list[float]
    peak_extra_bytes: int


# ---------------------------------------------------------------------------- variants


def make_inputs(shape: Shape, prompt_fraction: float, dtype: torch.dtype, device: str, seed: int = 0):
    """hidden [N, d], weight [V, d] (scaled so logits are O(1)) and labels with a prompt prefix."""
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(shape.rows, shape.hidden, generator=generator, device=device, dtype=dtype)
    weight = torch.randn(shape.vocab, shape.hidden, generator=generator, device=device, dtype=dtype)
    weight.mul_(shape.hidden**-0.5)
    labels = torch.randint(0, shape.vocab, (shape.rows,), generator=generator, device=device)
    # Prompt rows first, as in an SFT sample: the prompt precedes the response.
    labels[: int(prompt_fraction * shape.rows)] = IGNORE_INDEX
    return hidden.requires_grad_(True), weight.requires_grad_(True), labels


def naive_loss(hidden, weight, labels):
    # Logits upcast to fp32 before the CE, as Hugging Face causal-LM losses do.
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def ours_loss(backend: str, strategy: str = "row_chunks") -> Callable:
    def loss(hidden, weight, labels):
        return masked_linear_cross_entropy(hidden, weight, labels, IGNORE_INDEX, backend=backend, strategy=strategy)[0]

    return loss


def liger_loss() -> Optional[Callable]:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError as error:
        print(f"liger-kernel not importable ({error}); skipped", flush=True)
        return None
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    return lambda hidden, weight, labels: module(weight, hidden, labels)


def cce_loss() -> Optional[Callable]:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as error:
        print(f"cut-cross-entropy not importable ({error}); skipped", flush=True)
        return None
    return lambda hidden, weight, labels: linear_cross_entropy(
        hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )


# "ours" is the default strategy (row_chunks), the one the summary line reports; ours_vocab is the
# low-memory strategy, measured alongside for information.
CPU_VARIANTS: dict[str, Callable] = {
    "naive": naive_loss,
    "ours": ours_loss("torch"),
    "ours_vocab": ours_loss("torch", "vocab_blocks"),
}


def run_step(loss_fn: Callable, hidden, weight, labels) -> torch.Tensor:
    hidden.grad = None
    weight.grad = None
    loss = loss_fn(hidden, weight, labels)
    loss.backward()
    return loss.detach()


# ---------------------------------------------------------------------------- CPU


def proc_status_bytes(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} field")


def reset_peak_rss() -> None:
    """Set VmHWM (the peak RSS) to the current RSS (Linux >= 4.0, /proc/self/clear_refs "5")."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def cpu_worker(variant: str, shape: Shape, prompt_fraction: float, inner: int) -> Measurement:
    """Runs in a fresh process: one warm-up step at the measured shape, then `inner` timed steps.

    The warm-up step pays the one-time costs (BLAS workspaces and thread pools sized for this
    shape, lazily loaded code), about 9 MiB at the full shape; the peak is then reset so that the
    memory figure is that of a steady-state training step.
    """
    loss_fn = CPU_VARIANTS[variant]
    hidden, weight, labels = make_inputs(shape, prompt_fraction, torch.float32, "cpu")
    run_step(loss_fn, hidden, weight, labels)
    hidden.grad = weight.grad = None  # the measured steps allocate them: count them in the peak
    reset_peak_rss()
    rss_before = proc_status_bytes("VmRSS")
    seconds = []
    for _ in range(inner):
        start = time.perf_counter()
        run_step(loss_fn, hidden, weight, labels)
        seconds.append(time.perf_counter() - start)
    return Measurement(variant, prompt_fraction, seconds, proc_status_bytes("VmHWM") - rss_before)


def spawn_cpu_worker(variant: str, shape: Shape, prompt_fraction: float, inner: int, threads: int) -> Measurement:
    request = dict(variant=variant, shape=asdict(shape), prompt_fraction=prompt_fraction, inner=inner)
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    completed = subprocess.run(
        [sys.executable, __file__, "--cpu-worker", json.dumps(request)],
        capture_output=True, text=True, env=environment, check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"CPU worker {request} failed:\n{completed.stderr[-3000:]}")
    if completed.stderr.strip():
        print(completed.stderr.strip(), file=sys.stderr)
    return Measurement(**json.loads(completed.stdout.strip().splitlines()[-1]))


def run_cpu(shape: Shape, fractions: tuple[float, ...], repeats: int, inner: int, threads: int) -> None:
    measurements: list[Measurement] = []
    for repeat in range(repeats):
        for fraction in fractions:
            for variant in CPU_VARIANTS:
                measurement = spawn_cpu_worker(variant, shape, fraction, inner, threads)
                measurements.append(measurement)
                print(
                    f"cpu repeat={repeat} prompt={fraction:.0%} {variant:10s} "
                    f"seconds={['%.2f' % s for s in measurement.seconds]} "
                    f"peak_extra={measurement.peak_extra_bytes / 2**20:.0f}MiB",
                    flush=True,
                )
    floor_bytes = (shape.vocab * shape.hidden + shape.rows * shape.hidden) * 4
    summary = {}
    for fraction in fractions:
        medians = {}
        for variant in CPU_VARIANTS:
            runs = [m for m in measurements if m.variant == variant and m.prompt_fraction == fraction]
            medians[variant] = (
                statistics.median(s for m in runs for s in m.seconds),
                statistics.median(m.peak_extra_bytes for m in runs),
            )
        (naive_s, naive_b), (ours_s, ours_b) = medians["naive"], medians["ours"]
        summary[fraction] = (ours_s / naive_s, ours_b / naive_b, ours_b / floor_bytes)
        print(
            f"cpu N={shape.rows} d={shape.hidden} V={shape.vocab} prompt={fraction:.0%}: "
            f"naive {naive_s:.2f}s {naive_b / 2**30:.3f}GiB | ours {ours_s:.2f}s {ours_b / 2**30:.3f}GiB | "
            f"time_ratio={ours_s / naive_s:.3f} mem_ratio={ours_b / naive_b:.3f} "
            f"mem_over_floor={ours_b / floor_bytes:.3f} (floor dW+dH={floor_bytes / 2**30:.3f}GiB)",
            flush=True,
        )
        vocab_s, vocab_b = medians["ours_vocab"]
        print(
            f"cpu prompt={fraction:.0%}: ours_vocab {vocab_s:.2f}s {vocab_b / 2**30:.3f}GiB | "
            f"time_ratio={vocab_s / naive_s:.3f} mem_over_floor={vocab_b / floor_bytes:.3f}",
            flush=True,
        )
    time_ratio, mem_ratio, over_floor = summary[SUMMARY_PROMPT_FRACTION]
    print(f"kernel_bench cpu time_ratio={time_ratio:.3f} mem_ratio={mem_ratio:.3f} mem_over_floor={over_floor:.3f}")


# ---------------------------------------------------------------------------- GPU


def gpu_variants() -> dict[str, Callable]:
    variants = {
        "naive": naive_loss,
        "ours_triton": ours_loss("triton"),
        "ours_torch": ours_loss("torch"),
        "ours_vocab": ours_loss("torch", "vocab_blocks"),
    }
    for name, factory in (("liger", liger_loss), ("cce", cce_loss)):
        loss_fn = factory()
        if loss_fn is not None:
            variants[name] = loss_fn
    return variants


def gpu_peak_extra_bytes(loss_fn: Callable, inputs) -> tuple[int, float]:
    """(peak extra bytes, loss) of one step, measured after a warm-up step (JIT, autotuning)."""
    run_step(loss_fn, *inputs)
    hidden, weight, _ = inputs
    hidden.grad = weight.grad = None  # the measured step allocates them: count them in its peak
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = run_step(loss_fn, *inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, float(loss)


def gpu_milliseconds(loss_fn: Callable, inputs) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run_step(loss_fn, *inputs)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def run_gpu_case(shape: Shape, fraction: float, variants: dict[str, Callable], repeats: int) -> dict[str, dict]:
    """Per variant: peak extra bytes, loss, median ms; or an "error" (OOM, API mismatch)."""
    inputs = make_inputs(shape, fraction, torch.bfloat16, "cuda")
    results: dict[str, dict] = {}
    for name, loss_fn in variants.items():
        try:
            peak, loss = gpu_peak_extra_bytes(loss_fn, inputs)
            results[name] = {"peak_extra_bytes": peak, "loss": loss, "ms": []}
        except Exception as error:  # one failing third-party variant must not cost the other figures
            results[name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
            torch.cuda.empty_cache()
    runnable = [name for name in variants if "error" not in results[name]]
    for _ in range(repeats):
        for name in runnable:  # interleaved so clock and thermal drift hit all variants alike
            results[name]["ms"].append(gpu_milliseconds(variants[name], inputs))
    reference_loss = results["naive"].get("loss")
    for name in runnable:
        result = results[name]
        result["median_ms"] = statistics.median(result["ms"])
        if reference_loss is not None:
            result["loss_rel_diff_vs_naive"] = abs(result["loss"] - reference_loss) / max(abs(reference_loss), 1e-30)
    return results


def format_gpu_result(result: dict) -> str:
    if "error" in result:
        return f"error={result['error']}"
    return (
        f"time={result['median_ms']:.2f}ms peak_extra={result['peak_extra_bytes'] / 2**30:.3f}GiB "
        f"loss_rel_diff_vs_naive={result.get('loss_rel_diff_vs_naive', float('nan')):.2e}"
    )


def format_gpu_ratios(results: dict[str, dict], ours_name: str) -> str:
    """One of our variants over each variant that is not ours and ran: time and peak-memory ratios."""
    ours = results[ours_name]
    if "error" in ours:
        return f"{ours_name} failed"
    ratios = []
    for name, other in results.items():
        if not name.startswith("ours") and "error" not in other:
            ratios.append(
                f"vs_{name}: time={ours['median_ms'] / other['median_ms']:.3f} "
                f"mem={ours['peak_extra_bytes'] / max(other['peak_extra_bytes'], 1):.3f}"
            )
    return " | ".join(ratios)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def check_gpu_against_reference(device: str = "cuda") -> None:
    """Both backends against float64, with bias and a prompt half, before any timing."""
    ways = [("triton", "row_chunks"), ("torch", "row_chunks"), ("torch", "vocab_blocks")]
    for (backend, strategy), dtype in [(way, d) for way in ways for d in GPU_CHECK_TOLERANCE]:
        hidden, weight, labels = make_inputs(GPU_CHECK_SHAPE, 0.5, dtype, device)
        bias = torch.randn(GPU_VOCAB, device=device, dtype=dtype).requires_grad_(True)
        loss, _ = masked_linear_cross_entropy(
            hidden, weight, labels, IGNORE_INDEX, bias, backend=backend, strategy=strategy
        )
        (loss * 0.5).backward()
        expected = reference_masked_linear_cross_entropy(hidden, weight, labels, IGNORE_INDEX, bias, 0.5)
        errors = {
            "loss": relative_error(loss.detach(), expected.loss_sum),
            "grad_hidden": relative_error(hidden.grad, expected.grad_hidden),
            "grad_weight": relative_error(weight.grad, expected.grad_weight),
            "grad_bias": relative_error(bias.grad, expected.grad_bias),
        }
        verdict = "ok" if max(errors.values()) <= GPU_CHECK_TOLERANCE[dtype] else "FAIL"
        details = " ".join(f"{name}={error:.2e}" for name, error in errors.items())
        print(f"gpu check backend={backend} strategy={strategy} dtype={dtype} {verdict} {details}", flush=True)


def run_gpu(repeats: int) -> None:
    if not torch.cuda.is_available():
        print("gpu: CUDA is not available; GPU part skipped", flush=True)
        return
    print(f"gpu: {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    check_gpu_against_reference()
    variants = gpu_variants()
    for hidden_size in GPU_HIDDEN_SIZES:
        for rows in GPU_ROWS:
            for fraction in PROMPT_FRACTIONS:
                shape = Shape(rows, hidden_size, GPU_VOCAB)
                results = run_gpu_case(shape, fraction, variants, repeats)
                case = f"bf16 N={rows} d={hidden_size} V={GPU_VOCAB} prompt={fraction:.0%}"
                for name, result in results.items():
                    print(f"gpu {case} {name:11s} {format_gpu_result(result)}", flush=True)
                for ours_name in ("ours_triton", "ours_vocab"):
                    print(f"kernel_bench gpu {case} {ours_name} {format_gpu_ratios(results, ours_name)}", flush=True)


# ---------------------------------------------------------------------------- entry


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU shape, 50%% prompt only, one repeat")
    parser.add_argument("--gpu", action="store_true", help="also run the GPU part (before the CPU part)")
    parser.add_argument("--gpu-only", action="store_true", help="run the GPU part only")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per variant")
    parser.add_argument("--inner", type=int, default=2, help="timed steps per CPU subprocess")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per subprocess")
    parser.add_argument("--cpu-worker", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    if arguments.cpu_worker:
        request = json.loads(arguments.cpu_worker)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        measurement = cpu_worker(request["variant"], Shape(**request["shape"]), request["prompt_fraction"], request["inner"])
        print(json.dumps(asdict(measurement)))
        return
    if arguments.gpu or arguments.gpu_only:
        run_gpu(arguments.repeats)
    if arguments.gpu_only:
        return
    if arguments.quick:
        run_cpu(QUICK_CPU_SHAPE, (SUMMARY_PROMPT_FRACTION,), repeats=1, inner=1, threads=arguments.threads)
    else:
        run_cpu(FULL_CPU_SHAPE, PROMPT_FRACTIONS, arguments.repeats, arguments.inner, arguments.threads)


if __name__ == "__main__":
    main()
