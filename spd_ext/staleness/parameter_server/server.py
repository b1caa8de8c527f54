"""A server rank's side of the parameter server: receive, let the mode's policy decide,
reply; stop the job, or (elastic jobs) drop the worker, when a worker dies or stalls.

On fixed process groups (``PSProcessGroups``) a worker that sends nothing for
``dead_timeout`` seconds, or whose connection drops, stops the job: the server tells every
other worker to stop, naming it, and raises. Which rank died is read from the processes
themselves (every rank's host and pid are exchanged at start-up), not guessed from who
was silent longest.

In an elastic job (``PSSessions``: one torchft session per worker) such a worker is
dropped instead, named in the server's log (``ServerLog.events`` and stderr): the SSP
bound and the SyncPS barrier stop waiting for it, ASGD divides by the workers present.
New workers join at any time (``PSSessions.join``) and start at the slowest present
worker's step with the current weights. The job stops early only when fewer than
``min_workers`` are left.
"""

from __future__ import annotations

import queue
import re
import sys
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
    DROPPED,
    EXITED,
    HELLO,
    OK,
    PULL,
    PUSH,
    STALLED,
    STOP,
    TAKEN,
    TOO_FEW,
    Message,
    ServerStopped,
    header,
    receive_any,
)
from spd_ext.staleness.parameter_server.sessions import PSSessions, SessionLost


def _brief(error: Exception) -> str:
    """A communication error's gist: gloo's "[file.cc:537] Read error ...: Connection reset
    by peer. This is typically caused by ..." -> "Read error ...: Connection reset by peer"."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". ")[0]


@dataclass
class ServerLog:
    versions: list[tuple[int, int, int]] = field(default_factory=list)  # (worker, step, version)
    pulls: list[tuple[int, int, int]] = field(default_factory=list)  # (worker, step, min step)
    applied: list[tuple[int, int]] = field(default_factory=list)  # asgd/ssp: (worker, step)
    held_back: int = 0  # ssp: pushes applied later than they arrived (the read window)
    staleness: dict[int, list[float]] = field(default_factory=dict)  # steps
    dropped_late: int = 0
    updates: int = 0
    # elastic jobs: workers that joined a running job / were dropped, and what was logged
    joined: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    events: list[str] = field(default_factory=list)


class ParameterServer:
    """A server rank's side (its shard of the parameters). ``on_update(version, weights)``
    runs after every update it applies (evaluation curves) with its shard's weights, the
    Polyak ones under syncps."""

    def __init__(self, model: nn.Module, cfg: PSConfig, groups: PSProcessGroups | PSSessions,
                 on_update: Callable[[int, torch.Tensor], None] | None = None) -> None:
        self.cfg, self.groups = cfg, groups
        self.elastic = isinstance(groups, PSSessions)
        if self.elastic != cfg.elastic:
            raise UsageError("PSConfig(elastic=True) goes with PSSessions, a fixed job with "
                             f"PSProcessGroups; got elastic={cfg.elastic} and "
                             f"{type(groups).__name__}")
        world, rank = dist.get_world_size(), dist.get_rank()
        cfg.check_world(world)
        if rank >= cfg.servers:
            raise UsageError(f"rank {rank} is a worker (ranks 0..{cfg.servers - 1} serve); "
                             "call train_worker on it")
        if cfg.servers > 1 and groups.servers is None:
            raise UsageError(f"{cfg.servers} servers need their group: "
                             f"{type(groups).__name__}.create with PSConfig(servers="
                             f"{cfg.servers})")
        self.index = rank
        workers = [] if self.elastic else list(range(cfg.servers, world))
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
        self.log = ServerLog(staleness={w: [] for w in workers})
        self.progress = Progress(workers)
        self.policy = make_policy(self)
        self._numel = self.theta.numel()
        self._block_size = cfg.block_size if cfg.quantize else None  # of quantized pushes
        if self.elastic:
            self._inbox: queue.Queue = groups.inbox
            groups.server.numel = self._numel  # what its sessions' pushes carry
        else:
            self._inbox = queue.Queue()
        self._done_sent: set[int] = set()  # DONE messages the receiver thread has seen
        self._waiting: dict[int, int] = {}  # pulls not answered yet: worker -> step to start
        self._last_heard: dict[int, float] = {}
        self._sessions: dict = {}  # elastic: worker -> its Session
        self._pids: dict[int, int] = {}  # elastic: worker -> pid, as its HELLO said
        self._all_arrived = not self.elastic  # elastic: the job's first workers are here

    # -- messages -----------------------------------------------------------------
    def _receive_forever(self) -> None:
        """Fixed groups: read every worker's messages (elastic jobs: the sessions do)."""
        try:
            while True:
                msg = receive_any(self.groups.up, self.groups.down, self._numel,
                                  self._block_size)
                self._inbox.put(msg)
                if msg.kind == DONE:
                    self._done_sent.add(msg.source)
                    if self._done_sent == set(self.progress.workers):
                        return
        except Exception as exc:  # a dropped connection surfaces here
            self._inbox.put(exc)

    def _reply(self, worker: int, status: int, step: int = 0) -> None:
        """Status, the step the worker is to compute, the weights' version; then weights."""
        head = header(status, step, self.version)
        if self.elastic:  # the worker's session thread sends it
            self._sessions[worker].reply(head, self.theta.clone() if status == OK else None)
            return
        dist.send(head, dst=worker, group=self.groups.down)
        if status == OK:
            dist.send(self.theta, dst=worker, group=self.groups.down)

    def _event(self, text: str) -> None:
        self.log.events.append(text)
        print(f"spd_ext: parameter server {self.index}: {text}", file=sys.stderr, flush=True)

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
        try:
            shard = self._serve()
        finally:
            if self.elastic:
                self.groups.close()
        if self.groups.servers is None:
            return shard
        longest = max(end - start for start, end in self.bounds)
        padded = torch.zeros(longest, dtype=shard.dtype)
        padded[:shard.numel()] = shard
        parts = [torch.empty_like(padded) for _ in self.bounds]
        dist.all_gather(parts, padded, group=self.groups.servers)
        return torch.cat([part[:end - start] for part, (start, end) in zip(parts, self.bounds)])

    def _serve(self) -> torch.Tensor:
        opened = time.monotonic()
        self._last_heard = {w: opened for w in self.progress.workers}
        any_message = False
        if not self.elastic:
            threading.Thread(target=self._receive_forever, name="spd_ext-ps-recv",
                             daemon=True).start()
        last_poll = time.monotonic()
        while not (self._all_arrived and not self.progress.live()):
            try:
                msg = self._inbox.get(timeout=0.2)
            except queue.Empty:
                msg = None
            now = time.monotonic()
            if isinstance(msg, SessionLost):
                self._session_lost(msg)
            elif isinstance(msg, Exception):
                self._connection_failed(msg)
            if not self.elastic and now - last_poll > 1.0:  # a killed worker's connection
                last_poll = now  # may stay quiet
                self._stop_if_exited(self.progress.live())
            if isinstance(msg, Message):
                if not any_message:
                    any_message, self.started = True, time.perf_counter()
                self._dispatch(msg, now)
            if not self._all_arrived:
                self._wait_for_first_workers(now - opened)
            self.policy.tick(now)
            if self._all_arrived:
                self._answer_pulls()
            self._stop_if_stalled(now)
        return self.policy.weights

    def _dispatch(self, msg: Message, now: float) -> None:
        if msg.kind == HELLO:
            self._admit(msg, now)
            return
        if msg.source in self.progress.dropped:  # dropped as stalled, and speaking again
            if msg.kind == PULL:
                msg.session.reply(header(STOP, msg.source, DROPPED))
            return
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
            # a worker that joined a running job asks for step 0 and starts where it was put
            step = self.policy.start(max(asked, self.progress.clock[w]))
            if step is not None:
                self.log.pulls.append((w, step, self.progress.slowest(step)))
                self._reply(w, OK, step)
                del self._waiting[w]

    # -- elastic membership ---------------------------------------------------------
    def _admit(self, msg: Message, now: float) -> None:
        """A worker's HELLO: give it an id (server 0 chooses a joiner's), a step to start
        at (a joiner: the slowest present worker's), and answer."""
        session, joining = msg.session, bool(msg.extra)
        worker = msg.step
        if worker < 0:  # server 0 numbers joiners after every id the job has used
            worker = max([*self.progress.workers,
                          self.cfg.servers + self.groups.expected - 1]) + 1
        elif worker in self.progress.live():
            session.reply(header(STOP, worker, TAKEN))
            return
        clock = self.progress.slowest(0) if joining else 0
        self.progress.add(worker, clock)
        self.log.staleness.setdefault(worker, [])
        self._last_heard[worker] = now
        session.worker, session.pid = worker, msg.version
        self._sessions[worker], self._pids[worker] = session, msg.version
        session.reply(header(OK, clock, self.version, worker))
        if joining:
            self.log.joined.append(worker)
            self._event(f"worker {worker} (pid {msg.version}) joined at step {clock} "
                        f"(weights version {self.version}); {len(self.progress.live())} "
                        "worker(s) training")

    def _wait_for_first_workers(self, waited: float) -> None:
        """Answer no pull until the workers the job started with are here (so their
        steps start together), or ``dead_timeout`` passed with at least min_workers."""
        here, expected = len(self.progress.workers), self.groups.expected
        if here >= expected:
            self._all_arrived = True
        elif waited > self.cfg.dead_timeout:
            if here < self.cfg.min_workers:
                self._stop_all(f"only {here} of the job's {expected} workers connected in "
                               f"{self.cfg.dead_timeout:g} s (min_workers "
                               f"{self.cfg.min_workers})", -1, TOO_FEW)
            self._all_arrived = True
            self._event(f"only {here} of {expected} workers connected in "
                        f"{self.cfg.dead_timeout:g} s; going on with them")

    def _session_lost(self, lost: SessionLost) -> None:
        w = lost.session.worker
        if w is None or w not in self.progress.live():
            return  # never admitted, or already done or dropped
        self._drop(w, f"its session failed ({_brief(lost.error)})")

    def _drop(self, worker: int, reason: str) -> None:
        self.progress.drop(worker)
        self._waiting.pop(worker, None)
        self.log.dropped.append(worker)
        left = self.progress.live()
        text = (f"worker {worker} (pid {self._pids.get(worker, '?')}) dropped: {reason}; "
                f"{len(left)} worker(s) left")
        self._event(text)
        if left and len(left) < self.cfg.min_workers:
            self._stop_all(f"{text}, fewer than min_workers={self.cfg.min_workers}", worker,
                           TOO_FEW)
        if not left and not self.progress.done:
            self._stop_all(f"{text}: every worker is gone", worker, TOO_FEW)

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
        if stalled and self.elastic:
            for w in stalled:
                if w in self.progress.live():
                    self._drop(w, f"sent nothing for {self.cfg.dead_timeout:g} s")
        elif stalled:
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
        pending = []  # the sends in flight: their work must outlive them
        for w in self.progress.live():
            if self.elastic:  # its session sends it, answering the worker's next pull
                self._sessions[w].reply(header(STOP, culprit, why))
                continue
            try:  # non-blocking: a dead or stalled worker never posts the matching receive
                pending.append(dist.isend(header(STOP, culprit, why), dst=w,
                                          group=self.groups.down))
            except Exception:  # noqa: BLE001 - that worker's connection may be gone
                pass
        # let the live workers read it before this rank's error ends the job
        deadline = time.monotonic() + (5.0 if self.elastic else 0.5)
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if self.elastic and all(self._sessions[w].outbox.empty()
                                    for w in self.progress.live()):
                time.sleep(0.2)  # the last reply is on its way
                break
        raise ServerStopped(f"parameter server stopped: {reason}")
