"""Injected heterogeneity: every step sleeps base + jitter, a slow rank sleeps f times more."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from torch import nn

from spd_ext.errors import UsageError
from spd_ext.hooks import TrainerHooks


@dataclass(frozen=True)
class Straggler:
    base_delay: float = 0.0  # seconds every rank sleeps per step
    jitter: float = 0.0  # + uniform(0, jitter) seconds
    slow_rank: int | None = None  # this rank is slowed ...
    factor: float = 1.0  # ... f times ...
    every: int = 1  # ... every n steps
    seed: int = 0

    def __post_init__(self) -> None:
        if self.base_delay < 0 or self.jitter < 0:
            raise UsageError("straggler base_delay and jitter must be >= 0")
        if self.factor < 1 or self.every < 1:
            raise UsageError(f"straggler factor must be >= 1 and every >= 1, got factor="
                             f"{self.factor} every={self.every}")

    def delay(self, rank: int, step: int) -> float:
        rng = random.Random(self.seed * 1_000_003 + rank * 7919 + step)
        d = self.base_delay + rng.uniform(0.0, self.jitter)
        if rank == self.slow_rank and step % self.every == 0:
            d *= self.factor
        return d

    def sleep(self, rank: int, step: int) -> float:
        d = self.delay(rank, step)
        if d > 0:
            time.sleep(d)
        return d


class StragglerHooks(TrainerHooks):
    """Trainer hooks that sleep per the straggler schedule before every step, then call
    the wrapped hooks (a staleness strategy)."""

    def __init__(self, inner: TrainerHooks, straggler: Straggler, rank: int) -> None:
        self.inner, self.straggler, self.rank = inner, straggler, rank

    def before_step(self, step: int) -> None:
        self.straggler.sleep(self.rank, step)
        self.inner.before_step(step)

    def after_backward(self, model: nn.Module, step: int, loss: float) -> dict | None:
        return self.inner.after_backward(model, step, loss)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.inner.after_step(model, step)

    def evaluation_weights(self, model: nn.Module) -> list[torch.Tensor] | None:
        return self.inner.evaluation_weights(model)

    def finish(self, model: nn.Module) -> None:
        self.inner.finish(model)
