"""A server rank's side of the parameter server: receive, let the mode's policy decide,
reply; stop the job when a worker dies or stalls.

A worker that sends nothing for ``dead_timeout`` seconds, or whose connection drops, stops
the job: the server tells every other worker to stop, naming it, and raises. Which rank
died is read from the processes themselves (every rank's host and pid are exchanged at
start-up), not guessed from who was silent longest.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from spd_ext.comm.buckets import flatten
from spd_ext.errors import UsageError
from spd_ext.staleness.parameter_server.config import PSConfig, PSProcessGroups
from spd_ext.staleness.parameter_server.policies import Progress, make_policy
from spd_ext.staleness.parameter_server.protocol import (
    DONE,
    EXITED,
    OK,
    PULL,
    PUSH,
    STALLED,
    STOP,
    Message,
    ServerStopped,
    header,
    receive_message,
)


@dataclass
class ServerLog:
    versions: list[tuple[int, int, int]] = field(default_factory=list)  # (worker, step, version)
    pulls: list[tuple[int, int, int]] = field(default_factory=list)  # (worker, step, min step)
    applied: list[tuple[int, int]] = field(default_factory=list)  # asgd/ssp: (worker, step)
    held_back: int = 0  # ssp: pushes applied later than they arrived (the read window)
    staleness: dict[int, list[float]] = field(default_factory=dict)  # steps
    dropped_late: int = 0
    updates: int = 0


class ParameterServer:
    """A server rank's side (its shard of the parameters). ``on_update(version, weights)``
    runs after every update it applies (evaluation curves) with its shard's weights, the
    Polyak ones under syncps."""

    def __init__(self, model: nn.Module, cfg: PSConfig, groups: PSProcessGroups,
                 on_update: Callable[[int, torch.Tensor], None] | None = None) -> None:
        self.cfg, self.groups = cfg, groups
        world, rank = dist.get_world_size(), dist.get_rank()
        cfg.check_world(world)
        if rank >= cfg.servers:
            raise UsageError(f"rank {rank} is a worker (ranks 0..{cfg.servers - 1} serve); "
                             "call train_worker on it")
        if cfg.servers > 1 and groups.servers is None:
            raise UsageError(f"{cfg.servers} servers need PSProcessGroups.create({cfg.servers})")
        self.workers = list(range(cfg.servers, world))
        self.params = list(model.parameters())
        whole = flatten([p.detach() for p in self.params])
        self.bounds = cfg.shards(whole.numel())
        start, end = self.bounds[rank]
        self.theta = whole[start:end].clone()
        self.flat = torch.nn.Parameter(self.theta)
        self.optimizer = (torch.optim.SGD([self.flat], lr=cfg.lr, momentum=cfg.momentum)
                          if cfg.optimizer == "sgd" else
                          torch.optim.AdamW([self.flat], lr=cfg.lr, weight_decay=0.0))
        self.on_update = on_update
        self.started = time.perf_counter()  # reset when the first worker message arrives
        self.version = 0
        self.log = ServerLog(staleness={w: [] for w in self.workers})
        self.progress = Progress(self.workers)
        self.policy = make_policy(self)
        self._inbox: queue.Queue = queue.Queue()
        self._numel = self.theta.numel()
        self._block_size = cfg.block_size if cfg.quantize else None  # of quantized pushes
        self._done_sent: set[int] = set()  # DONE messages the receiver thread has seen
        self._waiting: dict[int, int] = {}  # pulls not answered yet: worker -> step to start
        self._last_heard: dict[int, float] = {}

    # -- messages -----------------------------------------------------------------
    def _receive_forever(self) -> None:
        try:
            while True:
                msg = receive_message(self.groups.up, self._numel, self._block_size)
                self._inbox.put(msg)
                if msg.kind == DONE:
                    self._done_sent.add(msg.source)
                    if self._done_sent == set(self.workers):
                        return
        except Exception as exc:  # a dropped connection surfaces here
            self._inbox.put(exc)

    def _reply(self, worker: int, status: int, step: int = 0) -> None:
        """Status, the step the worker is to compute, the weights' version; then weights."""
        dist.send(header(status, step, self.version), dst=worker, group=self.groups.down)
        if status == OK:
            dist.send(self.theta, dst=worker, group=self.groups.down)

    # -- updates ------------------------------------------------------------------
    def apply(self, grad: torch.Tensor) -> None:
        """One optimizer step on the shard; the policy decides when, and with what."""
        self.flat.grad = grad
        self.optimizer.step()
        self.version += 1
        self.log.updates += 1
        self.policy.updated()
        if self.on_update is not None:
            self.on_update(self.version, self.policy.weights)

    # -- loop ---------------------------------------------------------------------
    def serve(self) -> torch.Tensor:
        """Serve until every worker is done; returns the final weights (flat, all shards:
        collective over the servers when there are several)."""
        shard = self._serve()
        if self.groups.servers is None:
            return shard
        longest = max(end - start for start, end in self.bounds)
        padded = torch.zeros(longest, dtype=shard.dtype)
        padded[:shard.numel()] = shard
        parts = [torch.empty_like(padded) for _ in self.bounds]
        dist.all_gather(parts, padded, group=self.groups.servers)
        return torch.cat([part[:end - start] for part, (start, end) in zip(parts, self.bounds)])

    def _serve(self) -> torch.Tensor:
        self._last_heard = {w: time.monotonic() for w in self.workers}
        any_message = False
        threading.Thread(target=self._receive_forever, name="spd_ext-ps-recv", daemon=True).start()
        last_poll = time.monotonic()
        while len(self.progress.done) < len(self.workers):
            try:
                msg = self._inbox.get(timeout=0.2)
            except queue.Empty:
                msg = None
            now = time.monotonic()
            if isinstance(msg, Exception):
                self._connection_failed(msg)
            if now - last_poll > 1.0:  # a killed worker's connection may stay quiet
                last_poll = now
                self._stop_if_exited(self.progress.live())
            if msg is not None:
                if not any_message:
                    any_message, self.started = True, time.perf_counter()
                self._dispatch(msg, now)
            self.policy.tick(now)
            self._answer_pulls()
            self._stop_if_stalled(now)
        return self.policy.weights

    def _dispatch(self, msg: Message, now: float) -> None:
        self._last_heard[msg.source] = now
        if msg.kind == PULL:
            self._waiting[msg.source] = msg.step
        elif msg.kind == PUSH:
            self.progress.clock[msg.source] = msg.step + 1
            self.log.versions.append((msg.source, msg.step, msg.version))
            self.policy.push(msg, now)
        elif msg.kind == DONE:
            self.progress.done.add(msg.source)

    def _answer_pulls(self) -> None:
        for w, asked in list(self._waiting.items()):
            step = self.policy.start(asked)
            if step is not None:
                self.log.pulls.append((w, step, self.progress.slowest(step)))
                self._reply(w, OK, step)
                del self._waiting[w]

    # -- failures -----------------------------------------------------------------
    def _connection_failed(self, exc: Exception) -> None:
        live = self.progress.live()
        time.sleep(0.2)  # a dying worker's process may still be exiting
        self._stop_if_exited(live)
        self._stop_all(f"a worker's connection failed ({str(exc).splitlines()[0]}); no "
                       "worker process on this host exited; silent longest: "
                       f"rank {self._silent()}")

    def _stop_if_stalled(self, now: float) -> None:
        # A worker whose pull waits on this server (SyncPS holding the step for a
        # straggler) is not silent: it is waiting on us.
        stalled = [w for w in self.progress.live() if w not in self._waiting
                   and now - self._last_heard[w] > self.cfg.dead_timeout]
        if stalled:
            self._stop_if_exited(stalled)
            self._stop_all(f"worker(s) {stalled} sent nothing for "
                           f"{self.cfg.dead_timeout:.0f} s", stalled[0], STALLED)

    def _silent(self) -> str:
        live = self.progress.live()
        return str(min(live, key=lambda w: self._last_heard[w])) if live else "none"

    def _stop_if_exited(self, workers: list[int]) -> None:
        gone = self.groups.exited(workers)
        if gone:
            self._stop_all(f"worker {self.groups.describe(gone)} exited", gone[0], EXITED)

    def _stop_all(self, reason: str, culprit: int = -1, why: int = EXITED) -> None:
        """Tell every live worker to stop (naming ``culprit``, the rank that exited or
        stalled, when known) and raise."""
        # Non-blocking: a dead or stalled worker never posts the matching receive.
        pending = []
        for w in self.progress.live():
            try:
                pending.append(dist.isend(header(STOP, culprit, why), dst=w,
                                          group=self.groups.down))
            except Exception:  # noqa: BLE001 - that worker's connection may be gone
                pass
        time.sleep(0.5)  # let the live workers read it before this rank's error ends the job
        raise ServerStopped(f"parameter server stopped: {reason}")
