"""The torch internals spd_ext relies on, each behind one guarded helper.

torch has no public API for these; every helper says what it falls back to when a torch
release renames or drops the private name, so an upgrade degrades (or fails with a
message naming the helper) instead of breaking at import time.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


def premul_sum(factor: float | torch.Tensor, group: Any) -> Any | None:
    """NCCL's fused "multiply by ``factor``, then sum" reduce op, or None where it is not
    available (other back-ends, or a torch without it): the caller then scales the tensor
    itself and sums."""
    if getattr(dist, "_make_nccl_premul_sum", None) is None or \
            dist.get_backend(group) != "nccl":
        return None
    return premul_sum_op(factor)


def premul_sum_op(factor: float | torch.Tensor) -> dist.ReduceOp:
    """torch's PREMUL_SUM reduce op with ``factor`` (any backend that takes it)."""
    make = getattr(dist, "_make_nccl_premul_sum", None)
    if make is None:
        raise RuntimeError("spd_ext: this torch has no torch.distributed._make_nccl_premul_sum;"
                           " spd_ext.comm.torch_private.premul_sum_op needs updating for it")
    return make(factor)


def default_store() -> dist.Store:
    """The default process group's rendezvous store (set-up exchanges go through it, with
    a timeout, rather than through collectives that wait for the group's own 30 minutes)."""
    get = getattr(c10d, "_get_default_store", None)
    if get is None:
        raise RuntimeError("spd_ext: this torch has no torch.distributed.distributed_c10d."
                           "_get_default_store; spd_ext.comm.torch_private.default_store "
                           "needs updating for it")
    return get()


def set_default_group_timeout(timeout: timedelta) -> None:
    """Make ``timeout`` the timeout of every process group created later without one.

    ``new_group`` (DeepSpeed's data-parallel and ZeRO groups, spd_ext's tensor-parallel
    ones) falls back to torch's module default (30 minutes for gloo, 10 for NCCL), not
    to the default group's timeout, so a run's setting would bound only the world group.
    torch reads these module globals each time a group is created."""
    names = ("default_pg_timeout", "default_pg_nccl_timeout")
    if not any(isinstance(getattr(c10d, name, None), timedelta) for name in names):
        raise RuntimeError("spd_ext: this torch has no torch.distributed.distributed_c10d."
                           "default_pg_timeout; spd_ext.comm.torch_private."
                           "set_default_group_timeout needs updating for it")
    for name in names:
        if isinstance(getattr(c10d, name, None), timedelta):
            setattr(c10d, name, timeout)


def group_name(group: Any) -> str:
    """A name for ``group`` that every rank shares."""
    name = getattr(group, "group_name", None)  # public on ProcessGroup in recent torch
    if isinstance(name, str) and name:
        return name
    return c10d._get_process_group_name(group)


def resolve_group(name: str) -> Any:
    """The process group that :func:`group_name` calls ``name`` (what the functional
    collectives resolve their group arguments with)."""
    return c10d._resolve_process_group(name)


def live_groups() -> set[Any] | None:
    """The process groups torch.distributed has not destroyed, or None when it cannot
    tell (then nothing is released before the process ends)."""
    world = getattr(c10d, "_world", None)
    pg_map = getattr(world, "pg_map", None)
    return set(pg_map) if pg_map is not None else None


def flatten_dense(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch's own bucket flattening (``torch._utils._flatten_dense_tensors``, as DDP and
    DeepSpeed use); a plain concatenation where a torch release drops it."""
    from torch import _utils

    flatten = getattr(_utils, "_flatten_dense_tensors", None)
    if flatten is None:
        return torch.cat([t.reshape(-1) for t in tensors])
    return flatten(tensors)


def unflatten_dense(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped as ``like`` (``torch._utils._unflatten_dense_tensors``), or
    slices of it where a torch release drops that."""
    from torch import _utils

    unflatten = getattr(_utils, "_unflatten_dense_tensors", None)
    if unflatten is not None:
        return list(unflatten(flat, like))
    views, offset = [], 0
    for t in like:
        views.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return views
