"""Parameter server on torch.distributed point-to-point (no raw sockets): SSP, ASGD, SyncPS.

Ranks ``0 .. servers-1`` serve (one by default), the other ranks are workers. With
several servers the flat parameter vector is split into contiguous shards, one per server
(boundaries on quantization blocks, so a sharded push quantizes exactly like a whole
one), and every message below goes to each server with its shard. A worker's step is:
pull the parameters (each reply says which version its shard is), compute a gradient on
its batch, push it (optionally 8-bit block-quantized) tagged with those versions. Each
server runs the rules below on its shard:

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

Messages: worker -> server on one process group (read by a receiver thread with
any-source receives), server -> worker on another (the server's main thread), so sends
and receives never share a gloo context. A worker that sends nothing for
``dead_timeout`` seconds, or whose connection drops, stops the job: the server tells
every other worker to stop, naming it, and raises.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spd_ext.comm.buckets import copy_back, flatten, shard_bounds
from spd_ext.ops.quantize import QuantizedTensor, dequantize_blockwise, quantize_blockwise
from spd_ext.sync.metrics import WorkerMetrics
from spd_ext.sync.modes import Mode
from spd_ext.sync.stragglers import Straggler

PUSH, PULL, DONE = 1, 2, 3
OK, STOP = 0, 1
HEADER = 4  # int64: kind, worker step, version, (unused)


class ServerStopped(RuntimeError):
    """The parameter server ended the job (a worker died or stalled)."""


@dataclass
class PSConfig:
    mode: Mode
    optimizer: str = "sgd"  # the server's optimizer: sgd (with momentum) or adamw
    lr: float = 0.1
    momentum: float = 0.0
    quantize: bool = False  # 8-bit block-quantized gradient pushes
    block_size: int = 256
    straggler_timeout: float = 5.0  # syncps: seconds to wait for late gradients of a step
    polyak_beta: float = 0.9  # syncps: weight of the running average
    polyak_every: int = 0  # syncps: hand the Polyak weights to workers every n steps (0: never)
    dead_timeout: float = 60.0  # a worker silent this long stops the job
    servers: int = 1  # ranks 0..servers-1 serve one shard of the parameters each

    def __post_init__(self) -> None:
        if not self.mode.server:
            raise ValueError(f"mode {self.mode} is not a parameter-server mode")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"server optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.lr <= 0 or self.straggler_timeout <= 0 or self.dead_timeout <= 0:
            raise ValueError("lr, straggler_timeout and dead_timeout must be > 0")
        if not 0.0 <= self.polyak_beta < 1.0:
            raise ValueError(f"polyak_beta must be in [0, 1), got {self.polyak_beta}")
        if self.servers < 1 or self.block_size < 1:
            raise ValueError(f"servers and block_size must be >= 1, got servers={self.servers} "
                             f"block_size={self.block_size}")

    def check_world(self, world_size: int) -> None:
        if world_size <= self.servers:
            raise ValueError(f"mode {self.mode} with {self.servers} server(s) needs at least "
                             f"{self.servers + 1} ranks: ranks 0..{self.servers - 1} serve, the "
                             f"others work; got {world_size}")

    def shards(self, numel: int) -> list[tuple[int, int]]:
        """Each server's (start, end) in the flat parameters."""
        bounds = shard_bounds(numel, self.servers, self.block_size if self.quantize else 1)
        if any(end == start for start, end in bounds):
            raise ValueError(f"{numel} parameters are too few for {self.servers} servers "
                             f"(shards of whole {self.block_size}-element blocks when "
                             "quantizing); use fewer servers or a smaller block_size")
        return bounds


@dataclass
class Groups:
    """Two process groups over the same ranks, worker->server and server->worker, and one
    over the servers (None with a single server) that gathers the shards at the end."""

    up: Any
    down: Any
    servers: Any = None

    @classmethod
    def create(cls, servers: int = 1) -> Groups:
        """Collective: every rank calls it, with the ``PSConfig.servers`` of the job."""
        ranks = list(range(dist.get_world_size()))
        up, down = dist.new_group(ranks), dist.new_group(ranks)
        return cls(up, down, dist.new_group(list(range(servers))) if servers > 1 else None)


def _header(kind: int, step: int, version: int) -> torch.Tensor:
    return torch.tensor([kind, step, version, 0], dtype=torch.int64)


@dataclass(eq=False)  # compared by identity: a message is one event, not a value
class _Message:
    source: int
    kind: int
    step: int
    version: int
    grad: torch.Tensor | None = None


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

    def __init__(self, model: nn.Module, cfg: PSConfig, groups: Groups,
                 on_update=None) -> None:
        self.cfg, self.groups = cfg, groups
        world, rank = dist.get_world_size(), dist.get_rank()
        cfg.check_world(world)
        if rank >= cfg.servers:
            raise ValueError(f"rank {rank} is a worker (ranks 0..{cfg.servers - 1} serve); "
                             "call train_worker on it")
        if cfg.servers > 1 and groups.servers is None:
            raise ValueError(f"{cfg.servers} servers need Groups.create({cfg.servers})")
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
        self.polyak = self.theta.clone()
        self.version = 0
        self.log = ServerLog(staleness={w: [] for w in self.workers})
        self._inbox: queue.Queue = queue.Queue()
        self._numel = self.theta.numel()
        self._done_sent: set[int] = set()  # DONE messages the receiver thread has seen

    # -- messages -----------------------------------------------------------------
    def _receive_forever(self) -> None:
        try:
            while True:
                header = torch.empty(HEADER, dtype=torch.int64)
                work = dist.irecv(header, src=None, group=self.groups.up)
                work.wait()
                source = work._source_rank()
                kind, step, version = (int(v) for v in header[:3])
                grad = self._receive_gradient(source) if kind == PUSH else None
                self._inbox.put(_Message(source, kind, step, version, grad))
                if kind == DONE:
                    self._done_sent.add(source)
                    if self._done_sent == set(self.workers):
                        return
        except Exception as exc:  # a dropped connection surfaces here
            self._inbox.put(exc)

    def _receive_gradient(self, source: int) -> torch.Tensor:
        if self.cfg.quantize:
            nblocks = -(-self._numel // self.cfg.block_size)
            values = torch.empty(self._numel, dtype=torch.int8)
            scales = torch.empty(nblocks, dtype=torch.float32)
            dist.recv(values, src=source, group=self.groups.up)
            dist.recv(scales, src=source, group=self.groups.up)
            return dequantize_blockwise(QuantizedTensor(values, scales, torch.Size([self._numel]),
                                                        torch.float32, self.cfg.block_size))
        grad = torch.empty(self._numel, dtype=torch.float32)
        dist.recv(grad, src=source, group=self.groups.up)
        return grad

    def _reply(self, worker: int, status: int, step: int = 0) -> None:
        """Status, the step the worker is to compute, the weights' version; then weights."""
        dist.send(_header(status, step, self.version), dst=worker, group=self.groups.down)
        if status == OK:
            dist.send(self.theta, dst=worker, group=self.groups.down)

    # -- updates ------------------------------------------------------------------
    def _apply(self, grad: torch.Tensor) -> None:
        self.flat.grad = grad
        self.optimizer.step()
        self.version += 1
        self.log.updates += 1
        if self.cfg.mode.kind == "syncps":
            self.polyak.mul_(self.cfg.polyak_beta).add_(self.theta, alpha=1 - self.cfg.polyak_beta)
        if self.on_update is not None:
            self.on_update(self.version, self.polyak if self.cfg.mode.kind == "syncps"
                           else self.theta)

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
        kind, s = self.cfg.mode.kind, self.cfg.mode.value
        clock = {w: 0 for w in self.workers}  # pushes received
        done: set[int] = set()
        last_heard = {w: time.monotonic() for w in self.workers}
        waiting_pulls: dict[int, int] = {}  # worker -> step it wants to start
        step_grads: dict[int, torch.Tensor] = {}  # syncps: this step's gradients
        step_started: float | None = None
        sync_step = 0
        held: list[_Message] = []  # ssp: pushes not yet applied (see release_held)
        any_message = False
        threading.Thread(target=self._receive_forever, name="spd_ext-ps-recv", daemon=True).start()

        def slowest(default: int | None = None) -> int | None:
            """The step the slowest unfinished worker is at (``default`` once all are done)."""
            live = [clock[w] for w in self.workers if w not in done]
            return min(live) if live else default

        def can_start(worker: int, step: int) -> bool:
            if kind == "asgd":
                return True
            if kind == "ssp":
                return step - slowest(step) <= s
            return step <= sync_step  # syncps: once the previous step is applied

        def answer_pulls() -> None:
            for w, step in list(waiting_pulls.items()):
                if can_start(w, step):
                    if kind == "syncps":  # a late worker skips to the step being collected
                        step = max(step, sync_step)
                    self.log.pulls.append((w, step, slowest(step)))
                    self._reply(w, OK, step)
                    del waiting_pulls[w]

        def apply_push(msg: _Message) -> None:
            # Staleness in steps: N pushes make one step's worth of updates.
            self.log.staleness[msg.source].append((self.version - msg.version) / len(self.workers))
            self.log.applied.append((msg.source, msg.step))
            self._apply(msg.grad / len(self.workers))

        def release_held() -> None:
            # SSP's read window (Ho et al., 2013): a worker at step c sees every update of
            # steps < c - s and none of steps >= c + s. The earliest step anyone can still
            # read at is the slowest worker's, so a push of step t is applied once
            # t < slowest + s. For s = 0 that is when every worker has pushed step t: the
            # same weights as syncps.
            low = slowest()
            ready = [m for m in held if low is None or m.step < low + s]
            held[:] = [m for m in held if m not in ready]
            for m in sorted(ready, key=lambda m: (m.step, m.source)):
                apply_push(m)

        def finish_sync_step() -> None:
            nonlocal sync_step, step_started
            # In worker order, not arrival order: the same sum on every run and every shard.
            self._apply(torch.stack([step_grads[w] for w in sorted(step_grads)]).mean(0))
            for w in step_grads:
                self.log.staleness[w].append(0)
            step_grads.clear()
            sync_step += 1
            step_started = None
            every = self.cfg.polyak_every
            if every and sync_step % every == 0:
                self.theta.copy_(self.polyak)  # hand the averaged weights out

        while len(done) < len(self.workers):
            try:
                msg = self._inbox.get(timeout=0.2)
            except queue.Empty:
                msg = None
            now = time.monotonic()
            if isinstance(msg, Exception):
                self._stop_all(done, f"a worker's connection failed ({msg}); silent longest: "
                               f"{self._silent(last_heard, done)}")
            if msg is not None:
                if not any_message:
                    any_message, self.started = True, time.perf_counter()
                last_heard[msg.source] = now
                if msg.kind == PULL:
                    waiting_pulls[msg.source] = msg.step
                elif msg.kind == PUSH:
                    clock[msg.source] = msg.step + 1
                    self.log.versions.append((msg.source, msg.step, msg.version))
                    if kind == "syncps":
                        if msg.step == sync_step:
                            step_grads[msg.source] = msg.grad
                            step_started = step_started or now
                        else:
                            self.log.dropped_late += 1  # a step already applied: stale
                    elif kind == "ssp":
                        held.append(msg)
                    else:
                        apply_push(msg)
                elif msg.kind == DONE:
                    done.add(msg.source)
            if kind == "ssp" and held:
                release_held()
                if msg is not None and msg in held:
                    self.log.held_back += 1
            if kind == "syncps" and step_grads:
                everyone = set(step_grads) >= {w for w in self.workers if w not in done}
                if everyone or now - step_started > self.cfg.straggler_timeout:
                    finish_sync_step()  # late gradients of this step will be dropped
            answer_pulls()
            stalled = [w for w in self.workers if w not in done
                       and now - last_heard[w] > self.cfg.dead_timeout]
            if stalled:
                self._stop_all(done, f"worker(s) {stalled} sent nothing for "
                               f"{self.cfg.dead_timeout:.0f} s")
        return self.polyak if kind == "syncps" else self.theta

    def _silent(self, last_heard: dict[int, float], done: set[int]) -> str:
        live = [w for w in self.workers if w not in done]
        return str(min(live, key=lambda w: last_heard[w])) if live else "none"

    def _stop_all(self, done: set[int], reason: str) -> None:
        # Non-blocking: a dead or stalled worker never posts the matching receive.
        pending = []
        for w in self.workers:
            if w not in done:
                try:
                    pending.append(dist.isend(_header(STOP, 0, self.version), dst=w,
                                              group=self.groups.down))
                except Exception:  # noqa: BLE001 - that worker's connection may be gone
                    pass
        time.sleep(0.5)  # let the live workers read it before this rank's error ends the job
        raise ServerStopped(f"parameter server stopped: {reason}")


class Worker:
    """One worker's side of the protocol."""

    def __init__(self, model: nn.Module, cfg: PSConfig, groups: Groups) -> None:
        self.model, self.cfg, self.groups = model, cfg, groups
        self.rank = dist.get_rank()
        cfg.check_world(dist.get_world_size())
        if self.rank < cfg.servers:
            raise ValueError(f"rank {self.rank} is a server (ranks 0..{cfg.servers - 1} "
                             "serve); run ParameterServer(...).serve() on it")
        self.params = list(model.parameters())
        self.metrics = WorkerMetrics(self.rank)
        self._flat = flatten([p.detach() for p in self.params])
        self.bounds = cfg.shards(self._flat.numel())

    def pull(self, step: int) -> tuple[list[int], int]:
        """Fetch the weights for ``step``; returns (each shard's version, the step to
        compute), which SyncPS moves forward for a worker that fell behind."""
        start = time.perf_counter()
        steps = [step] * len(self.bounds)
        versions = [0] * len(self.bounds)
        ask = list(range(len(self.bounds)))
        while ask:
            for server in ask:
                dist.send(_header(PULL, steps[server], 0), dst=server, group=self.groups.up)
            for server in ask:
                reply = torch.empty(HEADER, dtype=torch.int64)
                dist.recv(reply, src=server, group=self.groups.down)
                if int(reply[0]) == STOP:
                    raise ServerStopped(f"worker {self.rank}: the parameter server stopped "
                                        f"the job (server rank {server}: another worker died "
                                        "or stalled; see that rank's error)")
                lo, hi = self.bounds[server]
                dist.recv(self._flat[lo:hi], src=server, group=self.groups.down)
                steps[server], versions[server] = int(reply[1]), int(reply[2])
            # SyncPS shards that moved this worker to different steps: catch up the others.
            ask = [server for server, s in enumerate(steps) if s < max(steps)]
            steps = [max(steps)] * len(steps)
        self.metrics.add_idle(time.perf_counter() - start)
        with torch.no_grad():
            copy_back(self._flat, self.params)
        return versions, steps[0]

    def push(self, step: int, versions: list[int]) -> None:
        grad = flatten([p.grad if p.grad is not None else torch.zeros_like(p)
                        for p in self.params])
        for server, (lo, hi) in enumerate(self.bounds):
            dist.send(_header(PUSH, step, versions[server]), dst=server, group=self.groups.up)
            if self.cfg.quantize:
                q = quantize_blockwise(grad[lo:hi], self.cfg.block_size)
                dist.send(q.values, dst=server, group=self.groups.up)
                dist.send(q.scales, dst=server, group=self.groups.up)
            else:
                dist.send(grad[lo:hi], dst=server, group=self.groups.up)
            self.metrics.messages += 1
        self.metrics.steps += 1

    def done(self) -> None:
        for server in range(len(self.bounds)):
            dist.send(_header(DONE, 0, 0), dst=server, group=self.groups.up)


def train_worker(model: nn.Module, cfg: PSConfig, groups: Groups, batches, steps: int,
                 straggler: Straggler | None = None,
                 on_step=None) -> WorkerMetrics:
    """A worker's loop: pull, forward/backward on ``batches('train', step)``, push."""
    worker = Worker(model, cfg, groups)
    step = 0
    while step < steps:
        versions, step = worker.pull(step)
        if step >= steps:
            break
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
