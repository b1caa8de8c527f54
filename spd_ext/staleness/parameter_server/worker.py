"""A worker's side of the parameter server: pull the weights (each reply says which
version its shard is), compute a gradient on a batch, push it (optionally 8-bit
block-quantized) tagged with those versions, to each server with its shard.

On fixed process groups, a worker whose connection to a server fails names the ranks
whose processes exited, read from the processes themselves as the server does, not
guessed. In an elastic job (``PSSessions``) the worker talks to each server over its own
torchft session and needs no process group: it may join a running job.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from spd_ext.comm.buckets import copy_back, flatten
from spd_ext.errors import UsageError
from spd_ext.staleness.faults import WorkerKill
from spd_ext.staleness.metrics import WorkerMetrics
from spd_ext.staleness.parameter_server.config import PSConfig, PSProcessGroups
from spd_ext.staleness.parameter_server.protocol import (
    DONE,
    HEADER,
    PULL,
    PUSH,
    STOP,
    GroupLink,
    ServerStopped,
    header,
    send_gradient,
    stop_reason,
)
from spd_ext.staleness.parameter_server.sessions import PSSessions
from spd_ext.staleness.stragglers import Straggler


class Worker:
    """One worker's side of the protocol."""

    def __init__(self, model: nn.Module, cfg: PSConfig,
                 groups: PSProcessGroups | PSSessions) -> None:
        self.model, self.cfg, self.groups = model, cfg, groups
        self.elastic = isinstance(groups, PSSessions)
        if self.elastic != cfg.elastic:
            raise UsageError("PSConfig(elastic=True) goes with PSSessions, a fixed job with "
                             f"PSProcessGroups; got elastic={cfg.elastic} and "
                             f"{type(groups).__name__}")
        if self.elastic:
            if groups.worker_id is None:
                raise UsageError("this PSSessions is a server's; a worker's comes from "
                                 "PSSessions.create on a worker rank or PSSessions.join")
            self.rank = groups.worker_id  # its id in the server's log
            self.links = groups.links
        else:
            self.rank = dist.get_rank()
            cfg.check_world(dist.get_world_size())
            if self.rank < cfg.servers:
                raise UsageError(f"rank {self.rank} is a server (ranks 0..{cfg.servers - 1} "
                                 "serve); run ParameterServer(...).serve() on it")
            self.links = [GroupLink(server, groups.up, groups.down)
                          for server in range(cfg.servers)]
        self.params = list(model.parameters())
        self.metrics = WorkerMetrics(self.rank)
        self._flat = flatten([p.detach() for p in self.params])
        self.bounds = cfg.shards(self._flat.numel())

    def _failed(self, exc: Exception) -> ServerStopped:
        """A send or receive failed: name the ranks whose processes exited."""
        if self.elastic:
            return ServerStopped(f"worker {self.rank}: lost the parameter server "
                                 f"({str(exc).splitlines()[0]}); it ended the job, or died")
        time.sleep(0.2)  # a dying rank's process may still be exiting
        world = len(self.groups.processes)
        gone = self.groups.exited([r for r in range(world) if r != self.rank])
        servers = [r for r in gone if r < self.cfg.servers]
        who = (f"parameter server {self.groups.describe(servers)} exited" if servers else
               f"{self.groups.describe(gone)} exited" if gone else
               f"the connection failed ({str(exc).splitlines()[0]}); no rank's process on "
               "this host exited")
        return ServerStopped(f"worker {self.rank}: {who}")

    def pull(self, step: int) -> tuple[list[int], int]:
        """Fetch the weights for ``step``; returns (each shard's version, the step to
        compute), which SyncPS moves forward for a worker that fell behind."""
        try:
            return self._pull(step)
        except RuntimeError as exc:
            if isinstance(exc, ServerStopped):
                raise
            raise self._failed(exc) from None

    def _pull(self, step: int) -> tuple[list[int], int]:
        start = time.perf_counter()
        steps = [step] * len(self.bounds)
        versions = [0] * len(self.bounds)
        ask = list(range(len(self.bounds)))
        while ask:
            for server in ask:
                self.links[server].send(header(PULL, steps[server], 0))
            for server in ask:
                reply = torch.empty(HEADER, dtype=torch.int64)
                self.links[server].recv(reply)
                if int(reply[0]) == STOP:
                    why = stop_reason(int(reply[1]), int(reply[2]), self.cfg.dead_timeout)
                    raise ServerStopped(f"worker {self.rank}: the parameter server (rank "
                                        f"{server}) stopped the job: {why}")
                lo, hi = self.bounds[server]
                self.links[server].recv(self._flat[lo:hi])
                steps[server], versions[server] = int(reply[1]), int(reply[2])
            # SyncPS shards that moved this worker to different steps: catch up the others.
            ask = [server for server, s in enumerate(steps) if s < max(steps)]
            steps = [max(steps)] * len(steps)
        self.metrics.add_idle(time.perf_counter() - start)
        with torch.no_grad():
            copy_back(self._flat, self.params)
        return versions, steps[0]

    def push(self, step: int, versions: list[int]) -> None:
        try:
            self._push(step, versions)
        except RuntimeError as exc:
            raise self._failed(exc) from None

    def _push(self, step: int, versions: list[int]) -> None:
        grad = flatten([p.grad if p.grad is not None else torch.zeros_like(p)
                        for p in self.params])
        block_size = self.cfg.block_size if self.cfg.quantize else None
        for server, (lo, hi) in enumerate(self.bounds):
            self.links[server].send(header(PUSH, step, versions[server]))
            send_gradient(grad[lo:hi], self.links[server], block_size)
            self.metrics.messages += 1
        self.metrics.steps += 1

    def done(self) -> None:
        try:
            for link in self.links:
                link.send(header(DONE, 0, 0))
        except RuntimeError as exc:
            raise self._failed(exc) from None


def train_worker(model: nn.Module, cfg: PSConfig, groups: PSProcessGroups | PSSessions,
                 batches: Callable[[str, int], tuple[torch.Tensor, torch.Tensor]], steps: int,
                 straggler: Straggler | None = None,
                 on_step: Callable[[int, float], None] | None = None,
                 kill: WorkerKill | None = None) -> WorkerMetrics:
    """A worker's loop: pull, forward/backward on ``batches('train', step)``, push.
    ``kill``: fault injection (this worker dies by SIGKILL when it is due)."""
    worker = Worker(model, cfg, groups)
    step = groups.start_step if isinstance(groups, PSSessions) else 0  # a joiner's
    started = time.perf_counter()
    while step < steps:
        versions, step = worker.pull(step)
        if step >= steps:
            break
        if kill is not None:
            kill.check(worker.rank, step, time.perf_counter() - started)
        if straggler is not None:  # simulated compute: between the pull and the push, so a
            straggler.sleep(worker.rank, step)  # slow worker's gradient really is stale
        x, y = batches("train", step)
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        worker.push(step, versions)
        if on_step is not None:
            on_step(step, loss.item())
        step += 1
    worker.done()
    return worker.metrics
