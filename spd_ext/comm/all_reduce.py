"""``all_reduce``: sum, mean or weighted sum over a process group, in place.

CPU tensors of float32 / bfloat16 / float16 whose ranks share a host go through the
shared-memory kernel, CUDA tensors of those dtypes up to the IPC buffer's capacity through
the CUDA IPC kernel (both: fp32 accumulation, bitwise-equal results on every rank).
Anything else (other dtypes, ranks on several hosts, larger CUDA tensors, the op
unavailable) goes through torch.distributed (NCCL for CUDA) with the same semantics.

Ranks must agree on every call: the same size, dtype and op, and the same weight list
where one is given. On CPU every path checks this before reducing and raises the same
:class:`CommError` on every rank if they differ (the shared-memory segment carries each
rank's description; without one, a small all-gather does); ``timeout`` bounds each wait
for a peer. CUDA tensors (the IPC kernel and NCCL) are not checked: that would need a
host synchronization per call (``TORCH_DISTRIBUTED_DEBUG=DETAIL`` checks NCCL's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from spd_ext.comm.backend import AllReduceBackend, ReduceCall
from spd_ext.comm.cuda_ipc import ipc_group
from spd_ext.comm.groups import CommError, check_timeout
from spd_ext.comm.shm import cached_shm_group, shm_group
from spd_ext.comm.torch_backend import TORCH_DISTRIBUTED
from spd_ext.comm.work import AllReduceWork
from spd_ext.errors import UsageError
from spd_ext.ops.codes import OP_CODES
from spd_ext.ops.weighted_reduce import as_weight_list

__all__ = ["CommError", "all_reduce", "backend_for", "path", "rank_weight"]


def _check_ready(group: Any) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("spd_ext.comm.all_reduce called before torch.distributed was "
                           "initialized; call torch.distributed.init_process_group(...) first "
                           "(torchrun and the deepspeed launcher set up the environment for it)")
    return dist.get_rank(group), dist.get_world_size(group)


def rank_weight(op: str, weights: torch.Tensor | Sequence[float] | None, rank: int,
                world_size: int, weight: float | None = None) -> float:
    """This rank's factor in the reduction: 1 (sum), 1/N (mean), or for ``"weighted"``
    ``weights[rank]`` (every rank's weights) or ``weight`` (this rank's own).

    Runs on every call, so the common cases avoid anything slower than a list lookup.
    """
    if op == "weighted":
        if weights is not None and weight is not None:
            raise UsageError("pass either weights= (every rank's weights) or weight= (this "
                             "rank's own), not both")
        if weight is not None:
            if isinstance(weight, (list, tuple, torch.Tensor)):
                raise UsageError("weight= is this rank's own weight, a number; pass every "
                                 "rank's weights as weights=")
            if not math.isfinite(weight):
                raise UsageError(f"this rank's weight {weight} is not finite; use weights "
                                 "that sum to 1")
            return float(weight)
        if isinstance(weights, torch.Tensor):
            values = (weights if weights.dim() == 1 else weights.reshape(-1)).tolist()
        elif weights is None:
            raise UsageError("op='weighted' needs weights= (one per rank, the same on every "
                             "rank) or weight= (this rank's own)")
        elif isinstance(weights, (int, float)):
            raise UsageError(f"weights={weights} is a single number: weights= takes every "
                             "rank's weights (one per rank); pass this rank's own weight as "
                             "weight=")
        else:
            values = list(weights)
        if len(values) != world_size:
            raise UsageError(f"got {len(values)} weights for {world_size} ranks; pass one "
                             "weight per rank (or this rank's own weight as weight=)")
        if not math.isfinite(sum(values)):  # NaN or inf anywhere makes the sum non-finite
            as_weight_list(values, len(values), "ranks")  # raises naming the entries
            raise UsageError(f"weights {values} overflow when summed; use weights that sum to 1")
        return float(values[rank])
    if op not in OP_CODES:
        raise UsageError(f"unknown op {op!r}; use one of {', '.join(OP_CODES)}")
    if weights is not None or weight is not None:
        raise UsageError(f"weights are only used with op='weighted', not op={op!r}")
    return 1.0 if op == "sum" else 1.0 / world_size


def _device_weight(weights: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's weight as a 1-element view of ``weights``: read on the device."""
    if weights.numel() != world_size:
        raise UsageError(f"got {weights.numel()} weights for {world_size} ranks; pass one "
                         "weight per rank")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    return weights.reshape(-1)[rank:rank + 1]


def all_reduce(tensor: torch.Tensor, op: str = "sum",
               weights: torch.Tensor | Sequence[float] | None = None,
               group: Any = None, *, weight: float | None = None,
               timeout: float | None = None, async_op: bool = False) -> Any:
    """Reduce ``tensor`` across the ranks of ``group`` in place and return it (with
    ``async_op=True``, an :class:`~spd_ext.comm.work.AllReduceWork` to ``wait()`` on).

    Args:
        tensor: the same shape and dtype on every rank. Non-contiguous tensors are
            reduced through a contiguous copy.
        op: ``"sum"``, ``"mean"`` or ``"weighted"`` (``sum_i weights[i] * tensor_i``).
        weights: for ``"weighted"``: every rank's weight, one finite number per rank (the
            same on every rank, which is checked; each rank's own entry scales its
            contribution inside the reduction). For a CUDA tensor, weights in a CUDA tensor
            stay on the device (no host sync, so they may change every step and the call
            can be captured in a CUDA graph); they are not checked for NaN, which would
            need one.
        group: a torch.distributed process group (default: the world).
        weight: for ``"weighted"``, instead of ``weights``: this rank's own weight (no
            list to agree on; each rank passes its own).
        timeout: seconds to wait for a peer that makes no progress before raising
            :class:`CommError` naming it (default ``$SPD_EXT_COMM_TIMEOUT`` or 300), at
            the group's set-up (the first call) and in every call on CPU. A large call that
            keeps making progress never times out.
        async_op: return at once with a handle; the tensor holds the result after its
            ``wait()``. Arguments are checked before returning; the group's set-up (its
            first call) and, off the kernel path on CPU, the ranks' agreement on the call
            are still waited for, so a mismatch raises here rather than aborting in gloo.
            Calls on one group complete in the order they were issued, synchronous ones
            included.
    """
    if timeout is not None:
        check_timeout(timeout)
    shm = cached_shm_group(group)  # per-call fast path: no torch.distributed queries
    # Checking arguments in Python costs as much as a small all-reduce: C++ does it.
    if shm is not None and weight is None and not async_op and not shm.progress.busy() \
            and shm.try_all_reduce_(tensor, op, weights, timeout):
        return tensor
    rank, world_size = (shm.rank, shm.world_size) if shm is not None else _check_ready(group)
    factor: float | torch.Tensor
    if op == "sum" and weights is None and weight is None:
        factor = 1.0
    elif op == "weighted" and tensor.is_cuda and isinstance(weights, torch.Tensor) \
            and weights.is_cuda and weight is None:
        factor = _device_weight(weights, rank, world_size)
    else:
        factor = rank_weight(op, weights, rank, world_size, weight)
    if op == "weighted" and not tensor.is_floating_point():  # before any rank waits
        raise TypeError(f"op='weighted' needs a floating-point tensor, got {tensor.dtype}")
    if world_size == 1:
        if op != "sum":
            tensor.mul_(factor)
        return AllReduceWork.completed(tensor) if async_op else tensor
    flat = tensor if tensor.is_contiguous() else tensor.contiguous()
    call = ReduceCall(tensor, flat, op, factor, weights, group, world_size, timeout)
    work = backend_for(flat, group, timeout).all_reduce(call, async_op)
    return work if async_op else tensor


def backend_for(tensor: torch.Tensor, group: Any = None,
                timeout: float | None = None) -> AllReduceBackend:
    """The backend that reduces ``tensor`` on ``group``: the shared-memory kernel for CPU
    tensors whose ranks share a host, the CUDA IPC kernel for CUDA tensors it suits,
    torch.distributed otherwise. Collective the first time for a group and device type
    (the group's set-up, each step waiting at most ``timeout`` seconds)."""
    if tensor.is_cpu:
        shm = shm_group(group, timeout)
        if shm is not None:  # also for dtypes it does not reduce: it checks their calls
            return shm
    elif tensor.is_cuda:
        ipc = ipc_group(group, timeout)
        if ipc is not None and ipc.suits(tensor):
            return ipc
    return TORCH_DISTRIBUTED


def path(tensor: torch.Tensor, group: Any = None) -> str:
    """``"shm"``, ``"cuda-ipc"`` or ``"torch.distributed"``: the path ``all_reduce(tensor)``
    takes (collective the first time for a group and device type)."""
    backend = backend_for(tensor, group)
    return backend.name if backend.suits(tensor) else TORCH_DISTRIBUTED.name
