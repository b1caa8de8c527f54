"""Parameter server on torch.distributed point-to-point (no raw sockets): SSP, ASGD, SyncPS.

Ranks ``0 .. servers-1`` serve (one by default), the other ranks are workers. With
several servers the flat parameter vector is split into contiguous shards, one per server
(boundaries on quantization blocks, so a sharded push quantizes exactly like a whole
one), and every message goes to each server with its shard. A worker's step is: pull the
parameters (each reply says which version its shard is), compute a gradient on its batch,
push it (optionally 8-bit block-quantized) tagged with those versions. Each server runs
its mode's rules on its shard.

- ``config``:   ``PSConfig`` (mode, server optimizer, timeouts, shards) and
                ``PSProcessGroups`` (the worker->server and server->worker groups, and
                every rank's host and pid for naming a rank that died);
- ``protocol``: the messages and how they are sent and received;
- ``policies``: the rules of ``asgd``, ``ssp:s`` and ``syncps``;
- ``sessions``: ``PSSessions``, the transport of elastic jobs (``PSConfig(elastic=
                True)``): one torchft session per worker and server, so workers may die
                (dropped) and join (``PSSessions.join``) mid-run;
- ``server``:   ``ParameterServer``, the serve loop and failure detection (a dead or
                silent worker stops the job, named; an elastic job drops it);
- ``worker``:   ``Worker`` and ``train_worker``.
"""

from spd_ext.staleness.parameter_server.config import PSConfig, PSProcessGroups
from spd_ext.staleness.parameter_server.protocol import (
    DONE,
    EXITED,
    HEADER,
    HELLO,
    OK,
    PULL,
    PUSH,
    STALLED,
    STOP,
    ServerStopped,
)
from spd_ext.staleness.parameter_server.server import ParameterServer, ServerLog
from spd_ext.staleness.parameter_server.sessions import PSSessions
from spd_ext.staleness.parameter_server.worker import Worker, train_worker

__all__ = [
    "DONE", "EXITED", "HEADER", "HELLO", "OK", "PULL", "PUSH", "STALLED", "STOP", "PSConfig",
    "PSProcessGroups", "PSSessions", "ParameterServer", "ServerLog", "ServerStopped", "Worker",
    "train_worker",
]
