"""Elastic parameter-server jobs: one torchft session per worker and server.

torchft's ``ParameterServer`` answers each worker that connects (an HTTP request to the
server's address) with a fresh two-rank reconfigurable gloo group, a session. A worker
that dies breaks only its own session, so the server drops it and serves the others on;
and a new process can join a running job with nothing but the servers' addresses (no
process group to be part of). Each session is read by its own thread (torchft's request
thread), which hands the server's main loop every message and sends the replies the main
loop decides on, so a session's gloo pair is only ever used by one thread.

``PSSessions.create`` sets a job's servers and first workers up together (collective over
the world they were launched in); ``PSSessions.join`` connects a worker to a running job.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import urllib.request
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache
from typing import Any

import torch
import torch.distributed as dist

from spd_ext.errors import UsageError
from spd_ext.staleness.parameter_server.config import PSConfig
from spd_ext.staleness.parameter_server.protocol import (
    DONE,
    HEADER,
    HELLO,
    PULL,
    STOP,
    ServerStopped,
    header,
    read_body,
    stop_reason,
)
from spd_ext.utils.optional import import_torchft

FEATURE = "an elastic parameter server (PSConfig(elastic=True))"


@dataclass
class SessionLink:
    """The other end of a torchft session (a two-rank gloo group: server 0, worker 1)."""

    pg: Any
    peer: int

    def send(self, tensor: torch.Tensor) -> None:
        self.pg.send([tensor], self.peer, 0).wait()

    def recv(self, tensor: torch.Tensor) -> None:
        self.pg.recv([tensor], self.peer, 0).wait()


@dataclass(eq=False)
class Session:
    """A worker's session on a server: its link, and the replies the main loop queued."""

    link: SessionLink
    worker: int | None = None  # set when the server admits its HELLO
    pid: int = 0
    outbox: queue.Queue = field(default_factory=queue.Queue)

    def reply(self, head: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        self.outbox.put((head, weights))


@dataclass(eq=False)
class SessionLost:
    """A session's connection failed (its worker died, most likely)."""

    session: Session
    error: Exception


def _timeout(cfg: PSConfig) -> timedelta:
    # A session waits on its peer through SSP holds and SyncPS straggler waits, which the
    # server ends by dropping a worker after dead_timeout; the group must outlast them.
    return timedelta(seconds=2 * cfg.dead_timeout + cfg.straggler_timeout + 30)


@cache
def _session_server_class() -> type:
    torchft = import_torchft(FEATURE)
    from torchft.parameter_server import ParameterServer as TorchftParameterServer
    from torchft.process_group import ProcessGroupGloo

    class SessionServer(TorchftParameterServer):
        """torchft's session server; every session's messages go to ``inbox``."""

        def __init__(self, cfg: PSConfig, inbox: queue.Queue, port: int) -> None:
            # numel: the server's shard, set by the ParameterServer (pushes come only after
            # it answers a pull, so after it is set)
            self.cfg, self.inbox, self.numel = cfg, inbox, 0
            self.block_size = cfg.block_size if cfg.quantize else None
            super().__init__(port=port)
            # torchft's request handler writes to its closed HTTP connection after a
            # session ends: a harmless error the HTTP server would print per session.
            self._server.handle_error = lambda request, address: None
            # ... and logs every session's request to stderr
            self._server.RequestHandlerClass.log_message = lambda *args: None

        @classmethod
        def new_process_group(cls) -> Any:
            return ProcessGroupGloo()

        def _handle_session(self, session_id: str, store_addr: str) -> None:
            pg = ProcessGroupGloo(timeout=_timeout(self.cfg))
            pg.configure(store_addr, replica_id="0", rank=0, world_size=2)
            self.forward(session_id, pg)

        def forward(self, session_id: str, pg: Any) -> None:
            session = Session(SessionLink(pg, 1))
            try:
                while True:
                    head = torch.empty(HEADER, dtype=torch.int64)
                    session.link.recv(head)
                    source = session.worker if session.worker is not None else -1
                    msg = read_body(head, source, session.link, self.numel, self.block_size)
                    msg.session = session
                    self.inbox.put(msg)
                    if msg.kind in (HELLO, PULL):
                        reply, weights = session.outbox.get()
                        session.link.send(reply)
                        if weights is not None:
                            session.link.send(weights)
                        if int(reply[0]) == STOP:
                            return
                    elif msg.kind == DONE:
                        return
            except Exception as exc:  # noqa: BLE001 - the worker's end is gone
                self.inbox.put(SessionLost(session, exc))

    del torchft
    return SessionServer


def _connect(address: str, cfg: PSConfig) -> SessionLink:
    import_torchft(FEATURE)
    from torchft.process_group import ProcessGroupGloo

    try:
        with urllib.request.urlopen(address, timeout=60) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"no parameter server answers at {address} ({exc}); check the "
                         "address its server printed, and that the job still runs") from None
    pg = ProcessGroupGloo(timeout=_timeout(cfg))
    pg.configure(data["store_addr"], replica_id="0", rank=1, world_size=2)
    return SessionLink(pg, 0)


@dataclass
class PSSessions:
    """An elastic job's transport. On a server: its session server and the inbox of every
    session's messages; on a worker: one session per server, and the worker's id."""

    cfg: PSConfig
    addresses: list[str]  # each server's session address, by server index
    expected: int = 0  # workers started with the job (servers wait for them at start)
    worker_id: int | None = None  # a worker's id (its rank when started with the job)
    links: list[SessionLink] = field(default_factory=list)  # a worker's, by server
    start_step: int = 0  # the step server 0 told a worker to start at
    inbox: queue.Queue | None = None  # a server's
    server: Any = None  # a server's torchft session server
    servers: Any = None  # the process group over the servers (None with one server)

    @classmethod
    def create(cls, cfg: PSConfig, port: int = 0) -> PSSessions:
        """Collective over the world the job was launched in (ranks 0..servers-1 serve,
        the others work): the servers listen for sessions (``port`` + server index, 0: any
        free port), everyone learns their addresses, the workers connect with their rank
        as id."""
        if not cfg.elastic:
            raise UsageError("PSSessions is the transport of elastic jobs; set "
                             "PSConfig(elastic=True) or use PSProcessGroups")
        world, rank = dist.get_world_size(), dist.get_rank()
        cfg.check_world(world)
        servers = dist.new_group(list(range(cfg.servers))) if cfg.servers > 1 else None
        inbox, server, address = None, None, ""
        if rank < cfg.servers:
            inbox = queue.Queue()
            server = _session_server_class()(cfg, inbox, port + rank if port else 0)
            print(f"spd_ext: parameter server {rank}: workers join at {server.address()}",
                  file=sys.stderr, flush=True)
            address = server.address()
        addresses: list[Any] = [None] * world
        dist.all_gather_object(addresses, address)
        job = cls(cfg, addresses[:cfg.servers], world - cfg.servers, inbox=inbox,
                  server=server, servers=servers)
        if rank >= cfg.servers:
            job._hello(rank, joining=False)
        return job

    @classmethod
    def join(cls, addresses: list[str], cfg: PSConfig, worker_id: int | None = None
             ) -> PSSessions:
        """Connect a new worker to a running elastic job (this process need not be in any
        process group): it is given an id (``worker_id``, or one server 0 chooses) and
        starts at the step of the slowest worker present, with the current weights."""
        if not cfg.elastic:
            raise UsageError("joining a running job needs PSConfig(elastic=True)")
        if len(addresses) != cfg.servers:
            raise UsageError(f"the job has {cfg.servers} server(s) (PSConfig.servers) but "
                             f"{len(addresses)} address(es) were given; give each server's")
        job = cls(cfg, list(addresses))
        job._hello(-1 if worker_id is None else worker_id, joining=True)
        return job

    def _hello(self, worker_id: int, joining: bool) -> None:
        """Open a session on every server (server 0 first: it chooses a joiner's id)."""
        for index, address in enumerate(self.addresses):
            link = _connect(address, self.cfg)
            link.send(header(HELLO, worker_id, os.getpid(), int(joining)))
            reply = torch.empty(HEADER, dtype=torch.int64)
            link.recv(reply)
            if int(reply[0]) == STOP:
                raise ServerStopped(f"worker {worker_id}: the parameter server (server "
                                    f"{index}) refused it: " + stop_reason(
                                        int(reply[1]), int(reply[2]), self.cfg.dead_timeout))
            if index == 0:
                self.start_step = int(reply[1])
            worker_id = int(reply[3])
            self.links.append(link)
        self.worker_id = worker_id

    def close(self) -> None:
        """Stop listening (a server, once its job ended)."""
        if self.server is not None:
            self.server._server.shutdown()
            self.server._server.server_close()
            self.server.store = None

