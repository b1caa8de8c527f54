"""Shared-memory all-reduce groups: one segment per process group, set up once.

The first ``all_reduce`` of CPU tensors on a process group runs :func:`shm_group`
collectively on every rank of the group:

1. all ranks exchange a host id and whether the C++ op loaded; a group that spans
   hosts, or where any rank lacks the op, uses torch.distributed (the reason is kept
   for ``describe``);
2. group rank 0 creates a segment with a job-unique name (pid + random token) and
   broadcasts the name with the settings every rank must share (chunk size, one-shot
   threshold);
3. the others attach, everyone reports success, and rank 0 unlinks the name. From then
   on only the mappings exist, so the segment disappears with the last process that
   maps it, however the processes end.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from spd_ext.comm.groups import GroupRegistry, env_bytes, single_host_reason
from spd_ext.comm.segments import remove_stale_segments
from spd_ext.ops.shm_allreduce import builder

#: Bytes each rank stages per call (and per buffer; every rank has two).
DEFAULT_CHUNK_BYTES = 1 << 20
#: Tensors up to this size use the one-shot algorithm (one barrier, every rank reduces
#: everything); larger ones use reduce-scatter + all-gather.
DEFAULT_ONESHOT_MAX_BYTES = 1 << 18

OP_CODES = {"sum": 0, "mean": 1, "weighted": 2}


def default_timeout() -> float:
    """Seconds a rank waits for its peers inside one call (``SPD_EXT_COMM_TIMEOUT``)."""
    return float(os.environ.get("SPD_EXT_COMM_TIMEOUT", "300"))


@dataclass
class ShmGroup:
    """A process group's shared-memory all-reduce context."""

    ctx: Any  # the C++ ShmAllReduce
    rank: int
    world_size: int
    oneshot_max_bytes: int
    timeout: float  # default per-call timeout, read from the environment at set-up

    @property
    def chunk_bytes(self) -> int:
        return self.ctx.chunk_bytes

    def all_reduce_(self, tensor: torch.Tensor, op: str, weight: float,
                    timeout: float | None) -> None:
        self.ctx.all_reduce_(tensor, OP_CODES[op], weight, self.oneshot_max_bytes,
                             self.timeout if timeout is None else timeout)

    def try_all_reduce_(self, tensor: torch.Tensor, op: str, weights: Any,
                        timeout: float | None) -> bool:
        """The per-call fast path, checked in C++; False (nothing done) unless the arguments
        are the common case (see the C++ method): the caller then checks them itself."""
        if weights is not None and not isinstance(weights, torch.Tensor):
            return False
        return self.ctx.try_all_reduce_(tensor, OP_CODES.get(op, -1), weights,
                                        self.oneshot_max_bytes,
                                        self.timeout if timeout is None else timeout)


def cached_shm_group(group: Any = None) -> ShmGroup | None:
    """The group's context if it is already set up (a dict lookup: the per-call fast path)."""
    return _registry.cached(group)


def shm_group(group: Any = None) -> ShmGroup | None:
    """The group's shared-memory context, set up on first use; None means torch.distributed.

    Collective on first call for a group: every rank of the group must call it.
    """
    return _registry.get(group)


def describe(group: Any = None) -> str:
    """Which path CPU all-reduces on ``group`` take, as set up so far."""
    return _registry.describe(
        group, "the first all_reduce on this group",
        lambda g: (f"shared memory ({g.world_size} ranks, chunk {g.chunk_bytes} B, one-shot "
                   f"up to {g.oneshot_max_bytes} B)"))


def _setup(group: Any) -> ShmGroup | str:
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    module = builder.load()
    reason = single_host_reason(group, module is not None, "shm_allreduce",
                                builder.status().reason)
    if reason:
        return reason
    error = _create_and_attach(group, module, rank, world)
    if isinstance(error, ShmGroup):
        return error
    # The op loaded and every rank is local, yet the segment failed: worth a warning.
    warnings.warn(f"spd_ext.comm: shared-memory all-reduce unavailable ({error}); using "
                  "torch.distributed for this process group", RuntimeWarning, stacklevel=4)
    return error


def _create_and_attach(group: Any, module: Any, rank: int, world: int) -> ShmGroup | str:
    ctx, error = None, None
    if rank == 0:
        remove_stale_segments()  # names left by earlier jobs' ranks killed during set-up
        name = f"/spd_ext_{os.getpid()}_{secrets.token_hex(6)}"
        chunk = env_bytes("SPD_EXT_SHM_CHUNK_BYTES", DEFAULT_CHUNK_BYTES)
        chunk = max(4096, chunk // 4096 * 4096)
        oneshot = env_bytes("SPD_EXT_SHM_ONESHOT_MAX_BYTES", DEFAULT_ONESHOT_MAX_BYTES)
        try:
            ctx = module.ShmAllReduce(name, 0, world, chunk, True)
        except (RuntimeError, ValueError, OSError) as exc:
            error = f"rank 0 could not create the segment: {exc}"
        settings = [name, oneshot, error]
    else:
        settings = [None, None, None]
    with _unlink_on_sigterm(ctx):
        return _attach(group, module, rank, world, ctx, settings)


@contextmanager
def _unlink_on_sigterm(ctx: Any) -> Iterator[None]:
    """While rank 0 holds a named segment, a SIGTERM (torchrun's teardown) unlinks the name
    before the process dies as it would have; SIGKILL cannot be caught: the next set-up
    on this host, or ``spd-ext clean``, removes that name."""
    if ctx is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        ctx.unlink()
        signal.signal(signal.SIGTERM, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # the default: die of SIGTERM, as without us
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _attach(group: Any, module: Any, rank: int, world: int, ctx: Any,
            settings: list) -> ShmGroup | str:
    dist.broadcast_object_list(settings, src=dist.get_global_rank(group or dist.group.WORLD, 0),
                               group=group)
    name, oneshot, error = settings
    if error:
        return error
    try:
        if rank != 0:
            try:
                ctx = module.ShmAllReduce(name, rank, world, 0, False)
            except (RuntimeError, ValueError, OSError) as exc:
                error = f"rank {rank} could not attach: {exc}"
        errors: list[Any] = [None] * world
        dist.all_gather_object(errors, error, group=group)
    finally:
        if rank == 0 and ctx is not None:
            ctx.unlink()
    failed = [e for e in errors if e]
    if failed:
        if ctx is not None:
            ctx.close()
        return "; ".join(failed)
    return ShmGroup(ctx=ctx, rank=rank, world_size=world, oneshot_max_bytes=oneshot,
                    timeout=default_timeout())


_registry: GroupRegistry[ShmGroup] = GroupRegistry(_setup)
