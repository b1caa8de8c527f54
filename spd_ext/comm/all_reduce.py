"""``all_reduce``: sum, mean or weighted sum over a process group, in place.

CPU tensors of float32 / bfloat16 / float16 whose ranks share a host go through the
shared-memory kernel, CUDA tensors of those dtypes up to the IPC buffer's capacity through
the CUDA IPC kernel (both: fp32 accumulation, bitwise-equal results on every rank).
Anything else (other dtypes, ranks on several hosts, larger CUDA tensors, the op
unavailable) goes through torch.distributed (NCCL for CUDA) with the same semantics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.graph import increment_version

from spd_ext.comm.cuda_ipc import ipc_group
from spd_ext.comm.shm import OP_CODES, cached_shm_group, shm_group
from spd_ext.ops.dtypes import KERNEL_DTYPES
from spd_ext.ops.weighted_reduce import as_weight_list


class CommError(RuntimeError):
    """A collective failed: a peer timed out or died, or ranks passed different tensors."""


def _check_ready(group: Any) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("spd_ext.comm.all_reduce called before torch.distributed was "
                           "initialized; call torch.distributed.init_process_group(...) first "
                           "(torchrun and the deepspeed launcher set up the environment for it)")
    return dist.get_rank(group), dist.get_world_size(group)


def rank_weight(op: str, weights: torch.Tensor | Sequence[float] | float | None, rank: int,
                world_size: int) -> float:
    """This rank's factor in the reduction: 1 (sum), 1/N (mean) or its weight.

    Runs on every call, so the common cases avoid anything slower than a list lookup.
    """
    if op == "weighted":
        if isinstance(weights, float) and math.isfinite(weights):
            return weights  # this rank's own weight: the cheapest form
        if isinstance(weights, float):
            values = [weights]
        elif isinstance(weights, torch.Tensor):
            values = (weights if weights.dim() == 1 else weights.reshape(-1)).tolist()
        elif weights is None:
            raise ValueError("op='weighted' needs weights: one per rank (the same list on every "
                             "rank), or this rank's own weight as a float")
        else:
            values = [float(weights)] if isinstance(weights, int) else list(weights)
        if len(values) == 1 and not isinstance(weights, (torch.Tensor, list, tuple)):
            rank = 0  # a bare float is this rank's own weight
        elif len(values) != world_size:
            raise ValueError(f"got {len(values)} weights for {world_size} ranks; pass one "
                             "weight per rank (or this rank's own weight as a float)")
        if not math.isfinite(sum(values)):  # NaN or inf anywhere makes the sum non-finite
            as_weight_list(values, len(values), "ranks")  # raises naming the entries
            raise ValueError(f"weights {values} overflow when summed; use weights that sum to 1")
        return float(values[rank])
    if op not in OP_CODES:
        raise ValueError(f"unknown op {op!r}; use one of {', '.join(OP_CODES)}")
    if weights is not None:
        raise ValueError(f"weights are only used with op='weighted', not op={op!r}")
    return 1.0 if op == "sum" else 1.0 / world_size


def _torch_all_reduce(tensor: torch.Tensor, op: str, weight: float | torch.Tensor,
                      world_size: int, group: Any) -> None:
    # Low-precision CPU sums go through fp32 so the fallback accumulates like the kernel.
    work = tensor.float() if (tensor.device.type == "cpu" and tensor.dtype in
                              (torch.bfloat16, torch.float16)) else tensor
    if op == "weighted":
        if not work.is_floating_point():
            raise TypeError(f"op='weighted' needs a floating-point tensor, got {tensor.dtype}")
        if isinstance(weight, torch.Tensor):  # NCCL reads the factor as the tensor's dtype
            weight = weight.to(work.dtype)
        if dist.get_backend(group) == "nccl":
            dist.all_reduce(work, op=dist._make_nccl_premul_sum(weight), group=group)
        else:
            work.mul_(weight)
            dist.all_reduce(work, group=group)
    else:
        dist.all_reduce(work, group=group)
        if op == "mean":
            if work.is_floating_point():
                work.div_(world_size)
            else:
                work.floor_divide_(world_size)
    if work is not tensor:
        tensor.copy_(work)
    else:  # torch.distributed writes in place without telling autograd; the kernel does tell
        increment_version(tensor)


def _device_weight(weights: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's weight as a 1-element view of ``weights``: read on the device."""
    if weights.numel() != world_size:
        raise ValueError(f"got {weights.numel()} weights for {world_size} ranks; pass one "
                         "weight per rank")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    return weights.reshape(-1)[rank:rank + 1]


def _shm_call(method: Any, *args: Any) -> Any:
    try:
        return method(*args)
    except (RuntimeError, ValueError) as exc:  # C++ errors arrive as these
        raise CommError(str(exc)) from None


def all_reduce(tensor: torch.Tensor, op: str = "sum",
               weights: torch.Tensor | Sequence[float] | float | None = None,
               group: Any = None, *, timeout: float | None = None) -> torch.Tensor:
    """Reduce ``tensor`` across the ranks of ``group`` in place and return it.

    Args:
        tensor: the same shape and dtype on every rank. Non-contiguous tensors are
            reduced through a contiguous copy.
        op: ``"sum"``, ``"mean"`` or ``"weighted"`` (``sum_i weights[i] * tensor_i``).
        weights: for ``"weighted"`` only: one finite weight per rank (the same on every
            rank; each rank's own entry scales its contribution inside the reduction) or
            this rank's weight as a float. For a CUDA tensor, weights in a CUDA tensor stay
            on the device (no host sync, so they may change every step and the call can be
            captured in a CUDA graph); they are not checked for NaN, which would need one.
        group: a torch.distributed process group (default: the world).
        timeout: seconds to wait for a peer inside the shared-memory kernel before raising
            :class:`CommError` naming it (default ``$SPD_EXT_COMM_TIMEOUT`` or 300).
    """
    shm = cached_shm_group(group)  # per-call fast path: no torch.distributed queries
    # Checking arguments in Python costs as much as a small all-reduce: C++ does it.
    if shm is not None and _shm_call(shm.try_all_reduce_, tensor, op, weights, timeout):
        return tensor
    rank, world_size = (shm.rank, shm.world_size) if shm is not None else _check_ready(group)
    weight: float | torch.Tensor
    if op == "sum" and weights is None:
        weight = 1.0
    elif op == "weighted" and tensor.is_cuda and isinstance(weights, torch.Tensor) \
            and weights.is_cuda:
        weight = _device_weight(weights, rank, world_size)
    else:
        weight = rank_weight(op, weights, rank, world_size)
    if world_size == 1:
        return tensor if op == "sum" else tensor.mul_(weight)
    flat = tensor if tensor.is_contiguous() else tensor.contiguous()
    if flat.is_cpu and shm is None:
        shm = shm_group(group)  # collective set-up on the group's first CPU all-reduce
    ipc = ipc_group(group) if flat.is_cuda else None  # collective set-up, first CUDA call
    if shm is not None and flat.is_cpu and flat.dtype in KERNEL_DTYPES:
        _shm_call(shm.all_reduce_, flat, op, weight, timeout)
    elif ipc is not None and ipc.suits(flat):
        ipc.all_reduce_(flat, op, weight)
    else:
        _torch_all_reduce(flat, op, weight, world_size, group)
    if flat is not tensor:
        tensor.copy_(flat)
    return tensor


def path(tensor: torch.Tensor, group: Any = None) -> str:
    """``"shm"``, ``"cuda-ipc"`` or ``"torch.distributed"``: the path ``all_reduce(tensor)``
    takes (collective the first time for a group and device type)."""
    if tensor.is_cuda:
        ipc = ipc_group(group)
        return "cuda-ipc" if ipc is not None and ipc.suits(tensor) else "torch.distributed"
    shm = shm_group(group)
    return "shm" if shm is not None and tensor.dtype in KERNEL_DTYPES else "torch.distributed"
