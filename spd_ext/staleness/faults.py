"""Injected failures for parameter-server jobs: a worker that dies as a lost machine would
(SIGKILL: no goodbye, no cleanup), at a step or after some seconds of training."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

from spd_ext.errors import UsageError


@dataclass(frozen=True)
class WorkerKill:
    """Worker ``worker`` dies as it starts step ``at_step``, or as it starts the first
    step ``after_s`` seconds or more into its training (one of the two)."""

    worker: int
    at_step: int | None = None
    after_s: float | None = None

    def __post_init__(self) -> None:
        if (self.at_step is None) == (self.after_s is None):
            raise UsageError("WorkerKill takes one of at_step and after_s, got "
                             f"at_step={self.at_step} after_s={self.after_s}")
        if (self.at_step is not None and self.at_step < 0) or \
                (self.after_s is not None and self.after_s < 0):
            raise UsageError(f"WorkerKill's at_step / after_s must be >= 0, got "
                             f"at_step={self.at_step} after_s={self.after_s}")

    def due(self, worker: int, step: int, elapsed: float) -> bool:
        if worker != self.worker:
            return False
        return step >= self.at_step if self.at_step is not None else elapsed >= self.after_s

    def check(self, worker: int, step: int, elapsed: float) -> None:
        """Kill this process now if it is due."""
        if self.due(worker, step, elapsed):
            print(f"spd_ext: fault injection: killing worker {worker} (pid {os.getpid()}) "
                  f"at step {step}, {elapsed:.1f} s into training", file=sys.stderr,
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
