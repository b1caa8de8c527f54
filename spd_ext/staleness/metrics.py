"""Per-worker staleness, idle time and throughput."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class WorkerMetrics:
    rank: int
    staleness: list[float] = field(default_factory=list)  # in steps, per applied gradient
    idle_seconds: float = 0.0  # waiting for peers or the server
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)
    messages: int = 0  # collectives or pushes issued

    def record_staleness(self, value: float) -> None:
        self.staleness.append(float(value))

    def add_idle(self, seconds: float) -> None:
        self.idle_seconds += seconds

    def summary(self) -> dict:
        elapsed = time.perf_counter() - self.started
        s = self.staleness
        return {
            "rank": self.rank, "steps": self.steps, "seconds": elapsed,
            "steps_per_second": self.steps / max(elapsed, 1e-9),
            "idle_seconds": self.idle_seconds,
            "idle_fraction": self.idle_seconds / max(elapsed, 1e-9),
            "staleness_mean": sum(s) / len(s) if s else 0.0,
            "staleness_max": max(s) if s else 0,
            "staleness_histogram": dict(sorted(Counter(round(v, 3) for v in s).items())),
            "messages_per_step": self.messages / max(self.steps, 1),
        }
