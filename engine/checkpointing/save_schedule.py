"""When to save: every N steps and/or every N minutes, decided the same way on every rank.

Clocks differ between ranks, so a time-based decision taken on each rank independently could make
one rank enter save_checkpoint (a collective) while another trains on: a hang. Only rank 0's clock
counts: the trainer all-reduces `time_due()` of rank 0 (0 elsewhere) together with the per-step
token count it reduces anyway, so the decision costs no extra collective, and every rank saves
after the same step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class SaveSchedule:
    every_steps: int = 0
    """Save after every N-th step (0 = off)."""
    every_minutes: float = 0.0
    """Save when this much wall time passed since the last save or the start (0 = off)."""
    clock: Callable[[], float] = time.monotonic
    _last_save: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"checkpoint.every_steps: must be >= 0, got {self.every_steps}")
        if self.every_minutes < 0:
            raise ValueError(f"checkpoint.every_minutes: must be >= 0, got {self.every_minutes}")
        self._last_save = self.clock()

    def time_due(self) -> bool:
        """Rank 0's opinion: has every_minutes passed since the last save?"""
        return self.every_minutes > 0 and self.clock() - self._last_save >= 60.0 * self.every_minutes

    def step_due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def saved(self) -> None:
        """Restart the minute count (call after every save, whatever triggered it)."""
        self._last_save = self.clock()
