"""Shared-memory all-reduce groups: one segment per process group, set up once.

The first ``all_reduce`` of CPU tensors on a process group runs :func:`shm_group`
collectively on every rank of the group:

1. all ranks exchange a host id and whether the C++ op loaded; a group that spans
   hosts, or where any rank lacks the op, uses torch.distributed (the reason is kept
   for ``describe``). These exchanges go through the process group's store with the
   call's timeout (:class:`~spd_ext.comm.groups.SetupExchange`), so a rank that never
   arrives is named within it;
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
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from spd_ext.comm.backend import ReduceCall
from spd_ext.comm.groups import (
    CommError,
    GroupRegistry,
    SetupExchange,
    default_timeout,
    env_bytes,
    group_key,
    single_host_reason,
)
from spd_ext.comm.process_group import SpdExtProcessGroup
from spd_ext.comm.segments import remove_stale_segments
from spd_ext.comm.torch_backend import torch_all_reduce
from spd_ext.comm.work import AllReduceWork, ProgressThread
from spd_ext.ops.codes import KERNEL_DTYPES, OP_CODES
from spd_ext.ops.shm_allreduce import builder

#: Bytes each rank stages per call (and per buffer; every rank has two).
DEFAULT_CHUNK_BYTES = 1 << 20
#: Tensors up to this size use the one-shot algorithm (one barrier, every rank reduces
#: everything); larger ones use reduce-scatter + all-gather.
DEFAULT_ONESHOT_MAX_BYTES = 1 << 18

@contextmanager
def _as_comm_error() -> Iterator[None]:
    """The C++ context's errors (peers' mismatches, timeouts) arrive as RuntimeError or
    ValueError; callers catch CommError."""
    try:
        yield
    except (RuntimeError, ValueError) as exc:
        raise CommError(str(exc)) from None


@dataclass
class ShmGroup:
    """A process group's shared-memory all-reduce context: the all-reduce backend for CPU
    ranks on one host (see :class:`~spd_ext.comm.backend.AllReduceBackend`)."""

    name: ClassVar[str] = "shm"

    ctx: Any  # the C++ ShmAllReduce
    rank: int
    world_size: int
    oneshot_max_bytes: int
    timeout: float  # default per-call timeout, read from the environment at set-up
    weights_hash: Any  # the C++ function: a weight list -> the hash ranks compare
    collective_codes: dict[str, int]  # "all_gather" -> the code the C++ context takes
    #: Runs the group's asynchronous calls (``all_reduce(..., async_op=True)``) in order.
    progress: ProgressThread = field(
        default_factory=lambda: ProgressThread("spd_ext-shm-progress"))

    @property
    def chunk_bytes(self) -> int:
        return self.ctx.chunk_bytes

    def suits(self, tensor: torch.Tensor) -> bool:
        """The kernel reduces CPU float32 / bfloat16 / float16 tensors; other CPU tensors
        are still checked through the segment, then reduced by torch.distributed."""
        return tensor.is_cpu and tensor.dtype in KERNEL_DTYPES

    def all_reduce(self, call: ReduceCall, async_op: bool) -> AllReduceWork | None:
        listed = self.weights_hash(weights) if (weights := call.weight_list()) else 0
        if not self.suits(call.flat):
            # Every rank checks the call through the segment (after the calls queued before
            # it), then torch.distributed reduces it as this thread's own collective: in
            # issue order with the caller's other torch.distributed calls on the group, which
            # one made from the progress thread could pair differently on other ranks.
            self.progress.drain()
            self.agree_(call.flat, call.op, float(call.factor), listed, call.timeout)
            return torch_all_reduce(call.flat, call.op, call.factor, call.world_size,
                                    call.group, async_op,
                                    result=None if call.flat is call.tensor else call.tensor)

        def reduce() -> None:
            self.all_reduce_(call.flat, call.op, float(call.factor), listed, call.timeout)
            call.copy_back()

        if async_op or self.progress.busy():  # after the calls already queued
            work = AllReduceWork(call.tensor, self.progress.submit(reduce, call.tensor))
            if async_op:
                return work
            work.wait()
            return None
        reduce()
        return None

    def all_reduce_(self, tensor: torch.Tensor, op: str, weight: float, weights_hash: int,
                    timeout: float | None) -> None:
        with _as_comm_error():
            self.ctx.all_reduce_(tensor, OP_CODES[op], weight, weights_hash,
                                 self.oneshot_max_bytes,
                                 self.timeout if timeout is None else timeout)

    def agree_(self, tensor: torch.Tensor, op: str, weight: float, weights_hash: int,
               timeout: float | None) -> None:
        """Check that every rank passes the same size, dtype, op and weight list for a
        tensor going through torch.distributed (every rank raises alike if not)."""
        self.check_call_(tensor, "all_reduce", OP_CODES[op], weight, timeout, weights_hash)

    def all_gather_(self, output: torch.Tensor, input: torch.Tensor, timeout: float) -> None:
        """``output`` (world_size x ``input``, rank-major) <- every rank's ``input``."""
        with _as_comm_error():
            self.ctx.all_gather_(output, input, timeout)

    def reduce_scatter_(self, output: torch.Tensor, input: torch.Tensor, op: str,
                        weight: float, timeout: float) -> None:
        """``output`` <- this rank's slice of the reduction of every rank's ``input``."""
        with _as_comm_error():
            self.ctx.reduce_scatter_(output, input, OP_CODES[op], weight, timeout)

    def broadcast_(self, tensor: torch.Tensor, root: int, timeout: float) -> None:
        with _as_comm_error():
            self.ctx.broadcast_(tensor, root, timeout)

    def check_call_(self, tensor: torch.Tensor, collective: str, op_code: int, weight: float,
                    timeout: float | None, weights_hash: int = 0) -> None:
        """Every rank checks that all make the same ``collective`` call on ``tensor`` (size,
        dtype, op, weight list), which torch.distributed then carries; ``"barrier"`` on an
        empty tensor is the barrier."""
        with _as_comm_error():
            self.ctx.agree_(tensor, op_code, weight, weights_hash,
                            self.timeout if timeout is None else timeout,
                            self.collective_codes[collective])

    def close(self) -> None:
        self.progress.close()
        self.ctx.close()

    def try_all_reduce_(self, tensor: torch.Tensor, op: str, weights: Any,
                        timeout: float | None) -> bool:
        """The per-call fast path, checked in C++; False (nothing done) unless the arguments
        are the common case (see the C++ method): the caller then checks them itself."""
        if weights is not None and not isinstance(weights, torch.Tensor):
            return False
        with _as_comm_error():
            return self.ctx.try_all_reduce_(tensor, OP_CODES.get(op, -1), weights,
                                            self.oneshot_max_bytes,
                                            self.timeout if timeout is None else timeout)


def cached_shm_group(group: Any = None) -> ShmGroup | None:
    """The group's context if it is already set up (a dict lookup: the per-call fast path)."""
    return _registry.cached(group)


def shm_group(group: Any = None, timeout: float | None = None) -> ShmGroup | None:
    """The group's shared-memory context, set up on first use; None means torch.distributed.

    Collective on first call for a group: every rank of the group must call it, each
    step waiting at most ``timeout`` seconds (default ``SPD_EXT_COMM_TIMEOUT``).
    """
    return _registry.get(group, timeout)



def describe(group: Any = None) -> str:
    """Which path CPU all-reduces on ``group`` take, as set up so far."""
    return _registry.describe(
        group, "the first all_reduce on this group",
        lambda g: (f"shared memory ({g.world_size} ranks, chunk {g.chunk_bytes} B, one-shot "
                   f"up to {g.oneshot_max_bytes} B)"))


def _setup(group: Any, timeout: float | None) -> ShmGroup | str:
    key = group_key(group)
    if isinstance(key, SpdExtProcessGroup):  # the backend set its segment up already
        return key.shm_group
    return open_shm_group(SetupExchange(group, "shared-memory all-reduce", timeout))


def open_shm_group(exchange: SetupExchange) -> ShmGroup | str:
    """Set up the group's segment through ``exchange`` (collective): its context, or why
    the group has none (then torch.distributed carries its collectives)."""
    module = builder.load()
    reason = single_host_reason(exchange, module is not None, "shm_allreduce",
                                builder.status().reason)
    if reason:
        return reason
    error = _create_and_attach(exchange, module, exchange.rank, exchange.world_size)
    if isinstance(error, ShmGroup):
        return error
    # The op loaded and every rank is local, yet the segment failed: worth a warning.
    warnings.warn(f"spd_ext.comm: shared-memory all-reduce unavailable ({error}); using "
                  "torch.distributed for this process group", RuntimeWarning, stacklevel=4)
    return error


def _create_and_attach(exchange: SetupExchange, module: Any, rank: int,
                       world: int) -> ShmGroup | str:
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
        return _attach(exchange, module, rank, world, ctx, settings)


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


def _attach(exchange: SetupExchange, module: Any, rank: int, world: int, ctx: Any,
            settings: list) -> ShmGroup | str:
    name, oneshot, error = exchange.broadcast(settings)
    if error:
        return error
    try:
        if rank != 0:
            try:
                ctx = module.ShmAllReduce(name, rank, world, 0, False)
            except (RuntimeError, ValueError, OSError) as exc:
                error = f"rank {rank} could not attach: {exc}"
        errors = exchange.all_gather(error)
    finally:
        if rank == 0 and ctx is not None:
            ctx.unlink()
    failed = [e for e in errors if e]
    if failed:
        if ctx is not None:
            ctx.close()
        return "; ".join(failed)
    return ShmGroup(ctx=ctx, rank=rank, world_size=world, oneshot_max_bytes=oneshot,
                    timeout=default_timeout(), weights_hash=module.weights_hash,
                    collective_codes=dict(module.COLLECTIVES))


_registry: GroupRegistry[ShmGroup] = GroupRegistry(_setup)
