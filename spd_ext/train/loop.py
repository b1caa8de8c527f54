"""The one training loop of spd_ext: `spd-ext train`, the :class:`~spd_ext.train.Trainer`
and the experiments all run :class:`TrainingLoop`.

The loop owns what every run shares: the learning rate of each step, the step time, when to
read the loss (on log steps only: nanoGPT's loop, so a GPU's queue of kernels is not
drained every step), the log records and progress lines, evaluation and checkpoints at
their intervals, and the final evaluation and checkpoint. What differs between runs comes
in as small parts, each testable alone:

- a **step** (``step(index) -> StepResult``): forward, backward and update of one step,
  through a plain model and optimizer or a DeepSpeed engine;
- an **evaluation** (``evaluate() -> float``): the mean validation loss;
- a **checkpointer** (:class:`Checkpointer`): the only writer of checkpoints; where a run
  names its latest checkpoint (``latest``), the checkpointer writes it, after the
  completion marker;
- ``read_loss``: a step's loss tensor as the number to log (a mean over the ranks where
  several train).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Checkpointer", "LoopResult", "LoopSettings", "StepResult", "TrainingDiverged",
           "TrainingLoop"]


@dataclass
class StepResult:
    """One step: this rank's mean loss (a tensor on its device, read only when logged), the
    tokens it trained on (every rank's, where the throughput is the job's) and what the
    step itself reports on its log line (syncs, weights, gradient norm, ...)."""

    loss: Any
    tokens: int
    metrics: dict = field(default_factory=dict)


class TrainingDiverged(FloatingPointError):
    """The training loss stopped being a finite number."""

    def __init__(self, step: int, loss: float, hint: str = "lower the learning rate") -> None:
        super().__init__(f"training loss became {loss} at step {step}; {hint}")
        self.step, self.loss = step, loss


class Checkpointer(Protocol):
    """Writes and reads a run's checkpoints; nothing else does."""

    def save(self, step: int) -> str:
        """Write the checkpoint of ``step`` (every rank calls it); returns where it went."""

    def load(self) -> tuple[int, dict]:
        """Restore the checkpoint to resume from: its step, and what the log's ``resume``
        event says of it."""


@dataclass(frozen=True)
class LoopSettings:
    steps: int
    log_interval: int
    eval_interval: int = 0  # 0: evaluate at the end only
    checkpoint_interval: int = 0  # 0: checkpoint at the end only (with a checkpointer)

    def logs(self, done: int, start: int) -> bool:
        """Whether step ``done`` is logged (its loss read): every log_interval, the first
        step of a run that started at ``start``, and the last."""
        return done % self.log_interval == 0 or done == self.steps or done == start + 1

    def due(self, done: int, interval: int) -> bool:
        """Whether an interval's work (evaluation, checkpoint) falls after step ``done``;
        the last step's is the loop's ``finish()``."""
        return bool(interval) and done % interval == 0 and done < self.steps


@dataclass
class LoopResult:
    start: int
    history: list[dict]  # the log records: the logged steps and the evaluations
    step_times: list[float]
    recent: list[Any]  # the last steps' loss tensors (on the device; read by the caller)
    tokens: int = 0
    last_loss: float = math.nan  # the last logged step's
    val_loss: float = math.nan
    seconds: float = 0.0
    checkpoint: str | None = None  # where the final checkpoint went


class TrainingLoop:
    """``run(start)`` trains steps ``start .. settings.steps - 1``; ``finish()`` evaluates
    and checkpoints the end. ``log`` (a RunLog) and ``progress`` (a Progress) are where the
    records and lines go on the ranks that write them (None elsewhere)."""

    def __init__(self, settings: LoopSettings, step: Callable[[int], StepResult],
                 optimizer: Any, lr_at: Callable[[int], float], evaluate: Callable[[], float],
                 read_loss: Callable[[Any], float] = float,
                 checkpointer: Checkpointer | None = None, log: Any = None,
                 progress: Any = None, mark: Callable[[str], None] = lambda phase: None,
                 diverged_hint: str = "lower the learning rate") -> None:
        self.settings, self.step, self.optimizer = settings, step, optimizer
        self.lr_at, self.evaluate, self.read_loss = lr_at, evaluate, read_loss
        self.checkpointer, self.log, self.progress, self.mark = checkpointer, log, progress, mark
        self.diverged_hint = diverged_hint
        self.result = LoopResult(start=0, history=[], step_times=[], recent=[])
        self._started = time.perf_counter()

    # -- the parts of a step ------------------------------------------------------------
    def resume(self) -> int:
        """Restore the checkpointer's checkpoint; the log forgets the steps after it (the
        resumed run redoes them). Returns the step to start from."""
        start, about = self.checkpointer.load()
        if self.log is not None:
            dropped = self.log.drop_after(start)
            self.log.event("resume", step=start, dropped_records=dropped, **about)
        return start

    def set_lr(self, step: int) -> float:
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def record(self, done: int, result: StepResult, lr: float, seconds: float) -> None:
        """Log step ``done`` (reading its loss) on log steps: every log_interval, the first
        step of the run and the last."""
        if not self.settings.logs(done, self.result.start):
            return
        loss = self.read_loss(result.loss)
        if not math.isfinite(loss):
            raise TrainingDiverged(done, loss, self.diverged_hint)
        self.result.last_loss = loss
        values = {"step": done, "loss": loss, "lr": lr, "step_time": seconds,
                  "tokens_per_sec": result.tokens / max(seconds, 1e-9),
                  "elapsed": time.perf_counter() - self._started, **result.metrics}
        self._write(values)
        if self.progress is not None:
            weights = result.metrics.get("weights")
            extra = ("w " + ",".join(f"{w:.2f}" for w in weights)) if weights else ""
            if "islands" in result.metrics:
                extra = f"islands {result.metrics['islands']}" + (f" | {extra}" if extra
                                                                  else "")
            self.progress.update(done, loss, seconds, result.tokens, extra)

    def evaluation(self, done: int, final: bool = False) -> float:
        self.mark("evaluating")
        val = self.evaluate()
        self._write({"step": done, "val_loss": val, "elapsed": time.perf_counter() -
                     self._started, **({"final": True} if final else {})})
        if self.progress is not None and not final:
            self.progress.line(f"step {done}: val loss {val:.4f}")
        return val

    def checkpoint(self, done: int) -> str | None:
        if self.checkpointer is None:
            return None
        where = self.checkpointer.save(done)
        if self.progress is not None and done < self.settings.steps:
            self.progress.line(f"step {done}: checkpoint {where}")
        return where

    def _write(self, values: dict) -> None:
        self.result.history.append(values)
        if self.log is not None:
            self.log.metrics(**values)

    # -- the loop -------------------------------------------------------------------------
    def run(self, start: int = 0) -> LoopResult:
        s, result = self.settings, self.result
        result.start = start
        self._started = time.perf_counter()
        for step in range(start, s.steps):
            self.mark(f"step {step + 1}")
            lr = self.set_lr(step)
            began = time.perf_counter()
            out = self.step(step)
            seconds = time.perf_counter() - began
            result.step_times.append(seconds)
            result.recent = [*result.recent[-9:], out.loss]
            result.tokens += out.tokens
            done = step + 1
            self.record(done, out, lr, seconds)
            if s.due(done, s.eval_interval):
                result.val_loss = self.evaluation(done)
            if s.due(done, s.checkpoint_interval):
                self.checkpoint(done)
        if self.progress is not None:
            self.progress.close()
        result.seconds = time.perf_counter() - self._started
        return result

    def finish(self) -> LoopResult:
        """The final evaluation and checkpoint (after ``run``)."""
        steps = self.settings.steps
        self.result.val_loss = self.evaluation(steps, final=True)
        self.result.checkpoint = self.checkpoint(steps)
        return self.result
