"""Each parameter-server mode's rules, one policy object per mode, run by every server on
its shard:

- ``asgd``:   applies every push as it arrives (gradient / N, so N pushes make one
              synchronous step's worth); staleness = versions applied since the pull.
- ``ssp:s``:  holds back a pull while the worker would be more than s steps ahead of
              the slowest unfinished worker, and applies a push of step t once t is
              below the slowest worker's step + s, so a worker at step c reads every
              update of steps < c - s and none of steps >= c + s (s = 0: syncps).
- ``syncps``: a barrier per step: waits for every worker's gradient of the step (up to
              ``straggler_timeout`` seconds after the first arrives, then goes on
              without the late ones and drops them when they come), applies the mean, and
              keeps Polyak-averaged weights that it hands out every ``polyak_every``
              steps and returns as the result.

Every server sees the same pushes in the same per-worker order, so the shards agree on
who is ahead (SSP) and which step is being collected (SyncPS); where a SyncPS shard has
moved on without a late worker while another has not yet, the worker pulls again from the
one behind until all its shards are at the same step.

The server's loop does the messaging and failure detection; it asks the policy whether a
waiting pull may be answered (:meth:`Policy.start`), hands it every push
(:meth:`Policy.push`), and lets it apply what has become due after every message or
quiet wait (:meth:`Policy.tick`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from spd_ext.errors import UsageError
from spd_ext.staleness.parameter_server.protocol import Message

if TYPE_CHECKING:
    from spd_ext.staleness.parameter_server.server import ParameterServer


class Progress:
    """Where the workers are: each one's clock (pushes received, so the step it is on),
    which of them are done, and (elastic jobs) which were dropped."""

    def __init__(self, workers: list[int]) -> None:
        self.workers = list(workers)
        self.clock = {w: 0 for w in workers}
        self.done: set[int] = set()
        self.dropped: set[int] = set()

    def add(self, worker: int, clock: int) -> None:
        """An elastic job's worker joined (or came back under its old id), at ``clock``."""
        if worker not in self.clock:
            self.workers.append(worker)
        self.clock[worker] = clock
        self.done.discard(worker)
        self.dropped.discard(worker)

    def drop(self, worker: int) -> None:
        self.dropped.add(worker)

    def live(self) -> list[int]:
        """The workers still training (not done, not dropped), in id order."""
        return sorted(w for w in self.workers if w not in self.done and w not in self.dropped)

    def present(self) -> int:
        """How many workers take part (dropped ones do not): ASGD's 1/N."""
        return len(self.workers) - len(self.dropped)

    def slowest(self, default: int | None = None) -> int | None:
        """The step the slowest unfinished worker is at (``default`` once all are done)."""
        live = [self.clock[w] for w in self.live()]
        return min(live) if live else default


class Policy:
    """A mode's rules on one server's shard. Updates go through ``server.apply``; the
    policy keeps its own state (held pushes, the step being collected, ...)."""

    def __init__(self, server: ParameterServer) -> None:
        self.server = server
        self.progress: Progress = server.progress

    def start(self, step: int) -> int | None:
        """May a worker asking to start ``step`` start now? The step it is to compute if
        its pull is answered now, None to hold the pull back."""
        return step

    def push(self, msg: Message, now: float) -> None:
        """A push arrived (the worker's clock already counts it)."""
        raise NotImplementedError

    def tick(self, now: float) -> None:
        """After every message, or a wait with none: apply what has become due."""

    def updated(self) -> None:
        """The server applied an update to its shard."""

    @property
    def weights(self) -> torch.Tensor:
        """The weights ``on_update`` sees and ``serve`` returns."""
        return self.server.theta


class ASGD(Policy):
    """``asgd``: every pull answered at once, every push applied as it arrives."""

    def push(self, msg: Message, now: float) -> None:
        self._apply_push(msg)

    def _apply_push(self, msg: Message) -> None:
        server, workers = self.server, max(self.progress.present(), 1)
        # Staleness in steps: N pushes make one step's worth of updates (N: the workers
        # taking part, so an elastic job's steps keep their size when one is dropped).
        stale = (server.version - msg.version) / workers
        server.log.staleness.setdefault(msg.source, []).append(stale)
        server.log.applied.append((msg.source, msg.step))
        server.apply(msg.grad / workers)


class SSP(ASGD):
    """``ssp:s``: ASGD inside a read window of ``s`` steps."""

    def __init__(self, server: ParameterServer, s: int) -> None:
        super().__init__(server)
        self.s = s
        self.held: list[Message] = []  # pushes not yet applied (see _release)

    def start(self, step: int) -> int | None:
        return step if step - self.progress.slowest(step) <= self.s else None

    def push(self, msg: Message, now: float) -> None:
        self.held.append(msg)
        self._release()
        if msg in self.held:
            self.server.log.held_back += 1

    def tick(self, now: float) -> None:
        if self.held:  # a worker that finished may have been the slowest
            self._release()

    def _release(self) -> None:
        # SSP's read window (Ho et al., 2013): a worker at step c sees every update of
        # steps < c - s and none of steps >= c + s. The earliest step anyone can still
        # read at is the slowest worker's, so a push of step t is applied once
        # t < slowest + s. For s = 0 that is when every worker has pushed step t: the
        # same weights as syncps.
        low = self.progress.slowest()
        ready = [m for m in self.held if low is None or m.step < low + self.s]
        self.held = [m for m in self.held if m not in ready]
        for m in sorted(ready, key=lambda m: (m.step, m.source)):
            self._apply_push(m)


class SyncPS(Policy):
    """``syncps``: one update per step, the mean of the step's gradients; Polyak weights."""

    def __init__(self, server: ParameterServer) -> None:
        super().__init__(server)
        cfg = server.cfg
        self.straggler_timeout = cfg.straggler_timeout
        self.polyak_beta, self.polyak_every = cfg.polyak_beta, cfg.polyak_every
        self.step = 0  # the step being collected
        self.grads: dict[int, torch.Tensor] = {}  # this step's gradients by worker
        self.started: float | None = None  # when this step's first gradient arrived
        self.polyak = server.theta.clone()

    def start(self, step: int) -> int | None:
        # Once the previous step is applied; a late worker skips to the step being collected.
        return max(step, self.step) if step <= self.step else None

    def push(self, msg: Message, now: float) -> None:
        if msg.step == self.step:
            self.grads[msg.source] = msg.grad
            self.started = self.started or now
        else:
            self.server.log.dropped_late += 1  # a step already applied: stale

    def tick(self, now: float) -> None:
        if not self.grads:
            return
        everyone = set(self.grads) >= set(self.progress.live())
        if everyone or now - self.started > self.straggler_timeout:
            self._finish_step()  # late gradients of this step will be dropped

    def _finish_step(self) -> None:
        server = self.server
        # In worker order, not arrival order: the same sum on every run and every shard.
        server.apply(torch.stack([self.grads[w] for w in sorted(self.grads)]).mean(0))
        for w in self.grads:
            server.log.staleness.setdefault(w, []).append(0)
        self.grads.clear()
        self.step += 1
        self.started = None
        if self.polyak_every and self.step % self.polyak_every == 0:
            server.theta.copy_(self.polyak)  # hand the averaged weights out

    def updated(self) -> None:
        self.polyak.mul_(self.polyak_beta).add_(self.server.theta, alpha=1 - self.polyak_beta)

    @property
    def weights(self) -> torch.Tensor:
        return self.polyak


def make_policy(server: ParameterServer) -> Policy:
    """The policy of ``server.cfg.mode``."""
    mode = server.cfg.mode
    if mode.kind == "asgd":
        return ASGD(server)
    if mode.kind == "ssp":
        return SSP(server, mode.value)
    if mode.kind == "syncps":
        return SyncPS(server)
    raise UsageError(f"mode {mode} has no parameter-server policy")
