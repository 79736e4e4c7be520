"""A stand-in for launcher/run.py that exercises the launch path without training anything.

Same command line as the real entry (`--config X.yaml [key=value ...]`, tolerating the deepspeed
launcher's `--local_rank`), so every launcher test starts it exactly as it would start training.
Each rank: discover() -> init_distributed() -> gloo all_reduce of (rank + 1), then writes
`<run_dir>/result-rank<R>-restart<N>.json`. With the override `wait_for_signal=<seconds>` it then
waits for SIGUSR1 like a long training run; on the signal it writes a "checkpoint", rank 0 writes
the PREEMPTED marker, and it exits 0 (the contract agreed with the trainer). A run that finds the
checkpoint at start counts as resumed and ends at once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

# Installed before anything slow: Python's default action for SIGUSR1 is to terminate.
_SIGNALLED = threading.Event()
signal.signal(signal.SIGUSR1, lambda signum, frame: _SIGNALLED.set())

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import yaml  # noqa: E402

from launcher.dist_env import discover  # noqa: E402
from launcher.process_group import init_distributed  # noqa: E402

CHECKPOINT = "checkpoint.json"
PREEMPT_MARKER = "PREEMPTED"
EXIT_NO_SIGNAL = 3


def parse_args(argv: list[str]) -> tuple[Path, dict[str, str]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    args, rest = parser.parse_known_args(argv)
    settings = dict(yaml.safe_load(args.config.read_text()) or {})
    for override in rest:
        key, _, value = override.partition("=")
        settings[key] = value
    return Path(settings["run_dir"]), settings


def wait_for_preemption(run_dir: Path, rank: int, seconds: float) -> int:
    import torch.distributed as dist

    deadline = time.monotonic() + seconds
    while not _SIGNALLED.is_set():
        if time.monotonic() > deadline:
            return EXIT_NO_SIGNAL
        time.sleep(0.1)
    # Every rank got the signal; the collective proves they all still take part in the "save".
    dist.barrier()
    if rank == 0:
        (run_dir / CHECKPOINT).write_text(json.dumps({"step": 1}))
        (run_dir / PREEMPT_MARKER).write_text("preempted\n")
    dist.barrier()
    return 0


def main(argv: list[str]) -> int:
    import torch
    import torch.distributed as dist

    run_dir, settings = parse_args(argv)
    run_dir.mkdir(parents=True, exist_ok=True)
    found = discover()
    resumed = (run_dir / CHECKPOINT).exists()
    init_distributed(found, timeout_minutes=float(settings.get("timeout_minutes", 2)))
    total = torch.tensor([float(found.rank + 1)])
    dist.all_reduce(total)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    result = {**found.__dict__, "sum": total.item(), "resumed": resumed, "restart": restart,
              "pid": os.getpid()}
    (run_dir / f"result-rank{found.rank}-restart{restart}.json").write_text(json.dumps(result))
    code = 0
    wait_seconds = float(settings.get("wait_for_signal", 0))
    if wait_seconds > 0 and not resumed:
        (run_dir / f"waiting-rank{found.rank}").write_text(str(os.getpid()))
        code = wait_for_preemption(run_dir, found.rank, wait_seconds)
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
