"""A parameter-server job's settings (``PSConfig``) and process groups (``PSProcessGroups``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from spd_ext.comm.buckets import shard_bounds
from spd_ext.comm.groups import host_id
from spd_ext.errors import UsageError
from spd_ext.staleness.modes import Mode
from spd_ext.utils.files import process_exited


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
    # Elastic jobs (torchft sessions, PSSessions): a worker that dies or stalls is dropped
    # and the others go on; new workers may join mid-run. The job stops early only when
    # fewer than min_workers are left.
    elastic: bool = False
    min_workers: int = 1

    def __post_init__(self) -> None:
        if not self.mode.server:
            raise UsageError(f"mode {self.mode} is not a parameter-server mode")
        if self.optimizer not in ("sgd", "adamw"):
            raise UsageError(f"server optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.lr <= 0 or self.straggler_timeout <= 0 or self.dead_timeout <= 0:
            raise UsageError("lr, straggler_timeout and dead_timeout must be > 0")
        if not 0.0 <= self.polyak_beta < 1.0:
            raise UsageError(f"polyak_beta must be in [0, 1), got {self.polyak_beta}")
        if self.min_workers < 1:
            raise UsageError(f"min_workers must be >= 1, got {self.min_workers}")
        if self.servers < 1 or self.block_size < 1:
            raise UsageError(f"servers and block_size must be >= 1, got servers={self.servers} "
                             f"block_size={self.block_size}")

    def check_world(self, world_size: int) -> None:
        if self.elastic and world_size - self.servers < self.min_workers:
            raise UsageError(f"min_workers={self.min_workers} but the job starts "
                             f"{world_size - self.servers} worker(s) ({world_size} ranks, "
                             f"{self.servers} serving); start more or lower min_workers")
        if world_size <= self.servers:
            raise UsageError(f"mode {self.mode} with {self.servers} server(s) needs at least "
                             f"{self.servers + 1} ranks: ranks 0..{self.servers - 1} serve, the "
                             f"others work; got {world_size}")

    def shards(self, numel: int) -> list[tuple[int, int]]:
        """Each server's (start, end) in the flat parameters."""
        bounds = shard_bounds(numel, self.servers, self.block_size if self.quantize else 1)
        if any(end == start for start, end in bounds):
            raise UsageError(f"{numel} parameters are too few for {self.servers} servers "
                             f"(shards of whole {self.block_size}-element blocks when "
                             "quantizing); use fewer servers or a smaller block_size")
        return bounds


@dataclass
class PSProcessGroups:
    """Two process groups over the same ranks, worker->server and server->worker, and one
    over the servers (None with a single server) that gathers the shards at the end."""

    up: Any
    down: Any
    servers: Any = None
    processes: list[tuple[str, int]] = field(default_factory=list)  # (host, pid) by rank

    @classmethod
    def create(cls, servers: int = 1) -> PSProcessGroups:
        """Collective: every rank calls it, with the ``PSConfig.servers`` of the job."""
        ranks = list(range(dist.get_world_size()))
        up, down = dist.new_group(ranks), dist.new_group(ranks)
        processes: list[Any] = [None] * len(ranks)
        dist.all_gather_object(processes, (host_id(), os.getpid()))
        return cls(up, down, dist.new_group(list(range(servers))) if servers > 1 else None,
                   [tuple(p) for p in processes])

    def exited(self, ranks: list[int]) -> list[int]:
        """Those of ``ranks`` whose process on this host is gone."""
        here = host_id()
        return [r for r in ranks if r < len(self.processes) and self.processes[r][0] == here
                and process_exited(self.processes[r][1])]

    def describe(self, ranks: list[int]) -> str:
        """"rank R (pid P), ..." for messages."""
        return ", ".join(f"rank {r} (pid {self.processes[r][1]})" for r in ranks)
