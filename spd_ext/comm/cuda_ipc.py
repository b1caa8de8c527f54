"""CUDA IPC all-reduce groups: buffers registered once per process group.

The first all-reduce of a CUDA tensor on a group runs :func:`ipc_group` on every rank:
it checks that the group suits (2-8 ranks, one host, the op built everywhere), has every
rank allocate its buffer, exchanges the cudaIpcMemHandles over the process group and maps
the peers' buffers. Groups that do not suit use torch.distributed (NCCL); ``describe``
says why. Sizes up to the one-shot threshold take the one-shot kernel, larger ones up to
the buffer capacity the two-shot kernel, larger still NCCL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from spd_ext.comm.groups import GroupRegistry, env_bytes, single_host_reason
from spd_ext.comm.shm import OP_CODES
from spd_ext.ops.cuda_allreduce import builder

DEFAULT_CAPACITY = 8 << 20
DEFAULT_ONESHOT_MAX_BYTES = 512 << 10
IPC_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class IpcGroup:
    ctx: Any  # the C++ IpcAllReduce
    rank: int
    world_size: int
    capacity: int
    oneshot_max_bytes: int

    def suits(self, tensor: torch.Tensor) -> bool:
        """Decided on what every rank shares (dtype, size), never on pointers."""
        padded = -(-tensor.numel() * tensor.element_size() // 16) * 16
        return tensor.dtype in IPC_DTYPES and 0 < padded <= self.capacity

    def all_reduce_(self, tensor: torch.Tensor, op: str, weight: float,
                    weights: torch.Tensor | None) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        # The kernel moves 16-byte packs: pad odd sizes and realign odd offsets in a copy.
        direct = nbytes % 16 == 0 and tensor.data_ptr() % 16 == 0
        work = tensor
        if not direct:
            work = torch.zeros(-(-nbytes // 16) * 16 // tensor.element_size(),
                               dtype=tensor.dtype, device=tensor.device)
            work[:tensor.numel()].copy_(tensor.reshape(-1))
        my_weight = None
        if op == "weighted" and weights is not None:  # stays on the GPU: no host sync
            my_weight = weights.reshape(-1)[self.rank:self.rank + 1].to(torch.float32)
        self.ctx.all_reduce_(work, OP_CODES[op], my_weight, weight,
                             work.numel() * work.element_size() > self.oneshot_max_bytes)
        if not direct:
            tensor.reshape(-1).copy_(work[:tensor.numel()])


def ipc_group(group: Any = None) -> IpcGroup | None:
    """The group's IPC context, set up on first use (collective); None: use NCCL."""
    return _registry.get(group)


def describe(group: Any = None) -> str:
    """Which path CUDA all-reduces on ``group`` take, as set up so far."""
    return _registry.describe(
        group, "the first all_reduce of a CUDA tensor",
        lambda g: (f"CUDA IPC ({g.world_size} ranks, one-shot up to {g.oneshot_max_bytes} B, "
                   f"two-shot up to {g.capacity} B)"))


def _setup(group: Any) -> IpcGroup | str:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if not 2 <= world <= 8:  # the same on every rank: no need to ask the others
        return f"the IPC all-reduce takes 2 to 8 ranks, this group has {world}"
    module = builder.load()
    reason = single_host_reason(group, module is not None, "cuda_allreduce",
                                builder.status().reason)
    if reason:
        return reason
    capacity = env_bytes("SPD_EXT_IPC_CAPACITY_BYTES", DEFAULT_CAPACITY) // 16 * 16
    oneshot = env_bytes("SPD_EXT_IPC_ONESHOT_MAX_BYTES", DEFAULT_ONESHOT_MAX_BYTES)
    settings = [capacity, oneshot] if rank == 0 else [None, None]
    dist.broadcast_object_list(settings, src=dist.get_global_rank(group or dist.group.WORLD, 0),
                               group=group)
    capacity, oneshot = settings
    ctx, error, handle = None, None, b""
    try:
        ctx = module.IpcAllReduce(rank, world, capacity)
        handle = ctx.handle()
    except RuntimeError as exc:
        error = f"rank {rank}: {exc}"
    handles: list[Any] = [None] * world
    dist.all_gather_object(handles, (handle, error), group=group)
    errors = [e for _, e in handles if e]
    if not errors:
        try:
            ctx.open([h for h, _ in handles])
        except RuntimeError as exc:
            errors = [f"rank {rank}: {exc}"]
        opened: list[Any] = [None] * world
        dist.all_gather_object(opened, errors[0] if errors else None, group=group)
        errors = [e for e in opened if e]
    if errors:
        return "; ".join(errors)
    return IpcGroup(ctx, rank, world, capacity, oneshot)


_registry: GroupRegistry[IpcGroup] = GroupRegistry(_setup)

