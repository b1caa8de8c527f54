"""Parameter server on torch.distributed point-to-point (no raw sockets): SSP, ASGD, SyncPS.

Rank 0 of the group serves; the other ranks are workers. A worker's step is: pull the
parameters (the reply says which version they are), compute a gradient on its batch, push
it (optionally 8-bit block-quantized) tagged with that version. The server:

- ``asgd``:   applies every push as it arrives (gradient / N, so N pushes make one
              synchronous step's worth); staleness = versions applied since the pull.
- ``ssp:s``:  the same, but holds back a pull while the worker would be more than s
              steps ahead of the slowest unfinished worker (s = 0: lock-step).
- ``syncps``: a barrier per step: waits for every worker's gradient of the step (up to
              ``straggler_timeout`` seconds after the first arrives, then goes on
              without the late ones and drops them when they come), applies the mean, and
              keeps Polyak-averaged weights that it hands out every ``polyak_every``
              steps and returns as the result.

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

from spd_ext.comm.buckets import copy_back, flatten
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

    def __post_init__(self) -> None:
        if not self.mode.server:
            raise ValueError(f"mode {self.mode} is not a parameter-server mode")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"server optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.lr <= 0 or self.straggler_timeout <= 0 or self.dead_timeout <= 0:
            raise ValueError("lr, straggler_timeout and dead_timeout must be > 0")
        if not 0.0 <= self.polyak_beta < 1.0:
            raise ValueError(f"polyak_beta must be in [0, 1), got {self.polyak_beta}")


@dataclass
class Groups:
    """Two process groups over the same ranks: worker->server and server->worker."""

    up: Any
    down: Any

    @classmethod
    def create(cls) -> Groups:
        ranks = list(range(dist.get_world_size()))
        return cls(dist.new_group(ranks), dist.new_group(ranks))


def _header(kind: int, step: int, version: int) -> torch.Tensor:
    return torch.tensor([kind, step, version, 0], dtype=torch.int64)


@dataclass
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
    staleness: dict[int, list[float]] = field(default_factory=dict)  # steps
    dropped_late: int = 0
    updates: int = 0


class ParameterServer:
    """Rank 0's side. ``on_update(version, weights)`` runs after every applied update
    (evaluation curves); it sees the Polyak weights under syncps."""

    def __init__(self, model: nn.Module, cfg: PSConfig, groups: Groups,
                 on_update=None) -> None:
        self.cfg, self.groups = cfg, groups
        self.workers = list(range(1, dist.get_world_size()))
        if not self.workers:
            raise ValueError(f"mode {cfg.mode} needs at least 2 ranks: rank 0 serves, the "
                             "others work")
        self.params = list(model.parameters())
        self.theta = flatten([p.detach() for p in self.params]).clone()
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
        """Serve until every worker is done; returns the final weights (flat)."""
        kind, s = self.cfg.mode.kind, self.cfg.mode.value
        clock = {w: 0 for w in self.workers}  # pushes received
        done: set[int] = set()
        last_heard = {w: time.monotonic() for w in self.workers}
        waiting_pulls: dict[int, int] = {}  # worker -> step it wants to start
        step_grads: dict[int, torch.Tensor] = {}  # syncps: this step's gradients
        step_started: float | None = None
        sync_step = 0
        any_message = False
        threading.Thread(target=self._receive_forever, name="spd_ext-ps-recv", daemon=True).start()

        def can_start(worker: int, step: int) -> bool:
            live = [clock[w] for w in self.workers if w not in done]
            slowest = min(live) if live else step
            if kind == "asgd":
                return True
            if kind == "ssp":
                return step - slowest <= s
            return step <= sync_step  # syncps: once the previous step is applied

        def answer_pulls() -> None:
            for w, step in list(waiting_pulls.items()):
                if can_start(w, step):
                    if kind == "syncps":  # a late worker skips to the step being collected
                        step = max(step, sync_step)
                    live = [clock[x] for x in self.workers if x not in done]
                    self.log.pulls.append((w, step, min(live) if live else step))
                    self._reply(w, OK, step)
                    del waiting_pulls[w]

        def finish_sync_step() -> None:
            nonlocal sync_step, step_started
            self._apply(torch.stack(list(step_grads.values())).mean(0))
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
                    else:  # staleness in steps: N pushes make one step's worth of updates
                        lag = (self.version - msg.version) / len(self.workers)
                        self.log.staleness[msg.source].append(lag)
                        self._apply(msg.grad / len(self.workers))
                elif msg.kind == DONE:
                    done.add(msg.source)
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
        self.params = list(model.parameters())
        self.metrics = WorkerMetrics(self.rank)
        self._flat = flatten([p.detach() for p in self.params])

    def pull(self, step: int) -> tuple[int, int]:
        """Fetch the weights for ``step``; returns (their version, the step to compute),
        which SyncPS moves forward for a worker that fell behind."""
        start = time.perf_counter()
        dist.send(_header(PULL, step, 0), dst=0, group=self.groups.up)
        reply = torch.empty(HEADER, dtype=torch.int64)
        dist.recv(reply, src=0, group=self.groups.down)
        if int(reply[0]) == STOP:
            raise ServerStopped(f"worker {self.rank}: the parameter server stopped the job "
                                "(another worker died or stalled; see rank 0's error)")
        dist.recv(self._flat, src=0, group=self.groups.down)
        self.metrics.add_idle(time.perf_counter() - start)
        with torch.no_grad():
            copy_back(self._flat, self.params)
        return int(reply[2]), int(reply[1])

    def push(self, step: int, version: int) -> None:
        grad = flatten([p.grad if p.grad is not None else torch.zeros_like(p)
                        for p in self.params])
        dist.send(_header(PUSH, step, version), dst=0, group=self.groups.up)
        if self.cfg.quantize:
            q = quantize_blockwise(grad, self.cfg.block_size)
            dist.send(q.values, dst=0, group=self.groups.up)
            dist.send(q.scales, dst=0, group=self.groups.up)
        else:
            dist.send(grad, dst=0, group=self.groups.up)
        self.metrics.messages += 1
        self.metrics.steps += 1

    def done(self) -> None:
        dist.send(_header(DONE, 0, 0), dst=0, group=self.groups.up)


def train_worker(model: nn.Module, cfg: PSConfig, groups: Groups, batches, steps: int,
                 straggler: Straggler | None = None,
                 on_step=None) -> WorkerMetrics:
    """A worker's loop: pull, forward/backward on ``batches('train', step)``, push."""
    worker = Worker(model, cfg, groups)
    step = 0
    while step < steps:
        version, step = worker.pull(step)
        if step >= steps:
            break
        if straggler is not None:  # simulated compute: between the pull and the push, so a
            straggler.sleep(worker.rank, step)  # slow worker's gradient really is stale
        x, y = batches("train", step)
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        worker.push(step, version)
        if on_step is not None:
            on_step(step, loss.item())
        step += 1
    worker.done()
    return worker.metrics
