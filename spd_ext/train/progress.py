"""Progress of a run on its first rank: a live bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any

__all__ = ["Progress"]


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _rate(tokens_per_second: float) -> str:
    if tokens_per_second >= 1e6:
        return f"{tokens_per_second / 1e6:.2f}M"
    return f"{tokens_per_second / 1e3:.1f}k" if tokens_per_second >= 1e3 else \
        f"{tokens_per_second:.0f}"


class Progress:
    """A live bar on a terminal (redrawn at most 10 times a second), plain lines every
    ``interval`` steps otherwise; only where ``enabled`` (rank 0)."""

    def __init__(self, total: int, start: int, interval: int, enabled: bool,
                 stream: Any = None) -> None:
        self.total, self.interval, self.enabled = total, interval, enabled
        self.stream = stream or sys.stdout
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.times: deque[float] = deque(maxlen=50)
        self._drawn = 0.0
        self._bar = False
        self.start = start

    def update(self, step: int, loss: float, seconds: float, tokens: int, extra: str = ""
               ) -> None:
        if not self.enabled:
            return
        self.times.append(seconds)
        mean = sum(self.times) / len(self.times)
        eta = mean * (self.total - step)
        text = (f"step {step:>{len(str(self.total))}}/{self.total} | loss {loss:.4f} | "
                f"{seconds * 1e3:.1f} ms/step | {_rate(tokens / max(mean, 1e-9))} tok/s | "
                f"ETA {_duration(eta)}" + (f" | {extra}" if extra else ""))
        if self.tty:
            now = time.monotonic()
            if now - self._drawn < 0.1 and step < self.total:
                return
            self._drawn = now
            width = 24
            done = int(width * step / self.total)
            bar = "#" * done + "." * (width - done)
            self.stream.write(f"\r\033[K[{bar}] {text}")
            self.stream.flush()
            self._bar = True
        elif step % self.interval == 0 or step == self.total or step == self.start + 1:
            print(text, file=self.stream, flush=True)

    def line(self, text: str) -> None:
        """A line that stays (evaluation, checkpoints)."""
        if not self.enabled:
            return
        if self._bar:
            self.stream.write("\r\033[K")
            self._bar = False
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self._bar:
            self.stream.write("\n")
            self.stream.flush()
            self._bar = False
