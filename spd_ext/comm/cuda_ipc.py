"""CUDA IPC all-reduce groups: buffers registered once per process group.

The first all-reduce of a CUDA tensor on a group runs :func:`ipc_group` on every rank:
it checks that the group suits (2-8 ranks, one host, the op built everywhere), has every
rank allocate its buffer, exchanges the cudaIpcMemHandles through the process group's
store (each step bounded by the call's timeout) and maps the peers' buffers. Groups that
do not suit use torch.distributed (NCCL); ``describe`` says why. Sizes up to the one-shot
threshold take the one-shot kernel, larger ones up to the buffer capacity the two-shot
kernel, larger still NCCL.

A call stages its input into the rank's buffer with one copy, unless the input lies in a
tensor from :func:`ipc_buffer`: memory every peer mapped when it was made, which the
kernel reads in place. Both paths can be captured in a CUDA graph once the group is set
up (the set-up itself is collective and host-synchronous: run one all-reduce first).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from spd_ext.comm.backend import ReduceCall
from spd_ext.comm.groups import (
    CommError,
    GroupRegistry,
    SetupExchange,
    env_bytes,
    single_host_reason,
)
from spd_ext.comm.work import AllReduceWork
from spd_ext.errors import UsageError
from spd_ext.ops.codes import KERNEL_DTYPES, OP_CODES
from spd_ext.ops.ipc_allreduce import builder

DEFAULT_CAPACITY = 8 << 20
DEFAULT_ONESHOT_MAX_BYTES = 512 << 10


@dataclass
class IpcGroup:
    """A process group's CUDA IPC all-reduce context: the all-reduce backend for 2-8 GPUs
    of one node (see :class:`~spd_ext.comm.backend.AllReduceBackend`)."""

    name: ClassVar[str] = "cuda-ipc"

    ctx: Any  # the C++ IpcAllReduce; None once closed
    rank: int
    world_size: int
    capacity: int
    oneshot_max_bytes: int

    def suits(self, tensor: torch.Tensor) -> bool:
        """Decided on what every rank shares (dtype, size), never on pointers."""
        padded = _packs_bytes(tensor.numel() * tensor.element_size())
        return tensor.is_cuda and tensor.dtype in KERNEL_DTYPES and 0 < padded <= self.capacity

    def all_reduce(self, call: ReduceCall, async_op: bool) -> AllReduceWork | None:
        self.all_reduce_(call.flat, call.op, call.factor)  # queued on the current stream
        call.copy_back()
        if not async_op:
            return None
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future(
            devices=[call.tensor.device])  # records an event; waiters' streams wait on it
        future.set_result(call.tensor)
        return AllReduceWork(call.tensor, future)

    def close(self) -> None:
        """Drop this group's hold on the IPC buffers: the mappings go once the kernels
        queued so far and the registered-buffer tensors still alive no longer need them
        (each keeps the C++ context alive). Later calls on the group raise."""
        self.ctx = None

    def all_reduce_(self, tensor: torch.Tensor, op: str, weight: float | torch.Tensor) -> None:
        """``weight``: this rank's factor, or for op="weighted" a 1-element CUDA tensor
        holding it (read by the kernel: no host sync)."""
        if self.ctx is None:
            raise CommError("spd_ext all_reduce: this group's CUDA IPC context was closed; "
                            "create a new process group")
        nbytes = tensor.numel() * tensor.element_size()
        # The kernel moves 16-byte packs: pad odd sizes and realign odd offsets in a copy.
        direct = nbytes % 16 == 0 and tensor.data_ptr() % 16 == 0
        work = tensor
        if not direct:
            work = torch.zeros(_packs_bytes(nbytes) // tensor.element_size(),
                               dtype=tensor.dtype, device=tensor.device)
            work[:tensor.numel()].copy_(tensor.reshape(-1))
        my_weight, uniform = None, weight
        if isinstance(weight, torch.Tensor):
            my_weight, uniform = weight.to(torch.float32), 1.0
        self.ctx.all_reduce_(work, OP_CODES[op], my_weight, uniform,
                             work.numel() * work.element_size() > self.oneshot_max_bytes)
        if not direct:
            tensor.reshape(-1).copy_(work[:tensor.numel()])

    def new_buffer(self, shape: tuple[int, ...], dtype: torch.dtype, group: Any) -> torch.Tensor:
        """A zeroed tensor in memory every rank maps (collective; see :func:`ipc_buffer`)."""
        index = -1

        def allocate() -> tuple[bytes, str]:
            nonlocal index
            index = self.ctx.allocate_buffer(max(16, _packs_bytes(math.prod(shape) *
                                                                  dtype.itemsize)))
            # The index differs if ipc_buffer was called a different number of times.
            return self.ctx.buffer_handle(index), f"{shape} {dtype} as buffer #{index}"

        errors = _map_peers(SetupExchange(group, "CUDA IPC buffer"), self.rank, allocate,
                            lambda handles: self.ctx.open_buffer(index, handles))
        if errors:
            raise RuntimeError("spd_ext.comm.ipc_buffer failed: " + "; ".join(errors))
        return self.ctx.buffer(index, list(shape), dtype).zero_()


def _packs_bytes(nbytes: int) -> int:
    """``nbytes`` rounded up to the kernel's 16-byte packs."""
    return -(-nbytes // 16) * 16


def _map_peers(exchange: SetupExchange, rank: int, allocate: Callable[[], tuple[bytes, str]],
               open_handles: Callable[[list[bytes]], None]) -> list[str]:
    """Collective: every rank allocates IPC memory (``allocate`` returns its handle and a
    description that must be equal on every rank), the handles are exchanged and every
    rank maps its peers' (``open_handles``, in rank order). Returns every rank's errors:
    none when all ranks succeeded."""
    handle, agreed, error = b"", "", None
    try:
        handle, agreed = allocate()
    except RuntimeError as exc:
        error = f"rank {rank}: {exc}"
    everyone = exchange.all_gather([handle, agreed, error])
    errors = [e for _, _, e in everyone if e]
    if not errors and len({a for _, a, _ in everyone}) > 1:
        errors = ["ranks disagree: " + ", ".join(f"rank {r}: {a}"
                                                 for r, (_, a, _) in enumerate(everyone))]
    if errors:
        return errors
    try:
        open_handles([h for h, _, _ in everyone])
    except RuntimeError as exc:
        error = f"rank {rank}: {exc}"
    return [e for e in exchange.all_gather(error) if e]


def ipc_group(group: Any = None, timeout: float | None = None) -> IpcGroup | None:
    """The group's IPC context, set up on first use (collective); None: use NCCL."""
    if (_registry.entry(group) is None and torch.cuda.is_available()
            and torch.cuda.is_current_stream_capturing()):
        raise RuntimeError(
            "spd_ext.comm.all_reduce: the first CUDA all-reduce on a group sets it up "
            "collectively (host synchronization, not allowed while a CUDA graph is being "
            "captured); run one all_reduce on this group before capturing")
    return _registry.get(group, timeout)


def ipc_buffer(shape: int | tuple[int, ...], dtype: torch.dtype = torch.float32,
               group: Any = None) -> torch.Tensor:
    """A zeroed CUDA tensor in memory that every rank of ``group`` maps (collective: the same
    shape and dtype on every rank, called in the same order).

    ``all_reduce`` of this tensor, or of a view into it at the same offset on every rank (up
    to the group's IPC capacity, ``$SPD_EXT_IPC_CAPACITY_BYTES``), reads the peers' copies
    in place instead of staging a copy, so gradients or activations can be written straight
    into it; its address is fixed, as a captured CUDA graph needs. If the ranks pass
    different tensors (registered on some ranks only, other offsets), every rank's result
    is NaN rather than a wrong sum. The memory stays mapped as long as the group's IPC
    context (until the group is destroyed or the context closed): make buffers once, at
    start-up, and reuse them.

    Raises RuntimeError when the group has no IPC path (``describe`` says why).
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"ipc_buffer supports {', '.join(map(str, KERNEL_DTYPES))}, got {dtype}")
    if any(d < 0 for d in shape):
        raise UsageError(f"ipc_buffer: negative dimension in shape {shape}")
    ipc = ipc_group(group)
    if ipc is None:
        raise RuntimeError(f"spd_ext.comm.ipc_buffer: this group has no CUDA IPC path "
                           f"({describe(group)}); use ordinary tensors, which go through "
                           "torch.distributed")
    return ipc.new_buffer(shape, dtype, group)


def describe(group: Any = None) -> str:
    """Which path CUDA all-reduces on ``group`` take, as set up so far."""
    return _registry.describe(
        group, "the first all_reduce of a CUDA tensor",
        lambda g: (f"CUDA IPC ({g.world_size} ranks, one-shot up to {g.oneshot_max_bytes} B, "
                   f"two-shot up to {g.capacity} B)"))


def _setup(group: Any, timeout: float | None) -> IpcGroup | str:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if not 2 <= world <= 8:  # the same on every rank: no need to ask the others
        return f"the IPC all-reduce takes 2 to 8 ranks, this group has {world}"
    module = builder.load()
    exchange = SetupExchange(group, "CUDA IPC all-reduce", timeout)
    reason = single_host_reason(exchange, module is not None, "ipc_allreduce",
                                builder.status().reason)
    if reason:
        return reason
    capacity = env_bytes("SPD_EXT_IPC_CAPACITY_BYTES", DEFAULT_CAPACITY) // 16 * 16
    oneshot = env_bytes("SPD_EXT_IPC_ONESHOT_MAX_BYTES", DEFAULT_ONESHOT_MAX_BYTES)
    capacity, oneshot = exchange.broadcast([capacity, oneshot])
    ctx = None

    def allocate() -> tuple[bytes, str]:
        nonlocal ctx
        ctx = module.IpcAllReduce(rank, world, capacity)
        return ctx.handle(), ""

    errors = _map_peers(exchange, rank, allocate, lambda handles: ctx.open(handles))
    if errors:
        return "; ".join(errors)
    return IpcGroup(ctx, rank, world, capacity, oneshot)


_registry: GroupRegistry[IpcGroup] = GroupRegistry(_setup)

