"""Stop requests by signal, recorded from the very start of the process.

SLURM sends SIGUSR1 before a job's time limit and schedulers send SIGTERM before preemption. Python's
default for SIGUSR1 is to die, so the entry point installs these handlers before its heavy imports;
the trainer checks `stop_requested()` at every step boundary, saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []
_owner_pid: Optional[int] = None


def _record(signum, _frame) -> None:
    if os.getpid() != _owner_pid:
        # A forked child (a data worker) inherited this handler: it must die on SIGTERM as usual,
        # or Pool.terminate() waits for it forever.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received.append(signum)


def install() -> None:
    global _owner_pid
    _owner_pid = os.getpid()
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


def stop_requested() -> Optional[int]:
    """The last stop signal received, or None."""
    return _received[-1] if _received else None

