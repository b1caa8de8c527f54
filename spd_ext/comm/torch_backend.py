"""torch.distributed as an all-reduce backend: what ``all_reduce`` falls back to when
neither spd_ext kernel applies (ranks on several hosts, other dtypes, larger CUDA tensors,
the op unavailable), with the kernels' semantics.

On CPU the ranks' calls are compared first (one small all-gather, bounded by the timeout),
so a mismatch raises the same :class:`CommError` on every rank instead of hanging or
aborting inside gloo. With ``async_op`` the handle wraps torch's own ``Work``.
"""

from __future__ import annotations

import math
import struct
import threading
import weakref
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.graph import increment_version

from spd_ext.comm.backend import ReduceCall
from spd_ext.comm.groups import CommError, default_timeout, group_key
from spd_ext.comm.torch_private import premul_sum
from spd_ext.comm.work import AllReduceWork
from spd_ext.ops.codes import OP_CODES


class TorchDistributedBackend:
    """torch.distributed's all_reduce (gloo, NCCL), for any tensor and group."""

    name = "torch.distributed"

    def suits(self, tensor: torch.Tensor) -> bool:
        return True

    def all_reduce(self, call: ReduceCall, async_op: bool) -> AllReduceWork | None:
        with one_caller(call.group):
            if call.flat.is_cpu:  # CUDA: checking would cost a host sync per call
                agree_over_torch(call.flat, call.op, float(call.factor), call.weight_list(),
                                 call.group, call.world_size, call.timeout)
            return torch_all_reduce(call.flat, call.op, call.factor, call.world_size,
                                    call.group, async_op,
                                    result=None if call.flat is call.tensor else call.tensor)

    def close(self) -> None:
        """Nothing to release: torch.distributed owns the group's resources."""


#: The one instance (the backend keeps no state of its own).
TORCH_DISTRIBUTED = TorchDistributedBackend()


_DTYPE_NAMES = {zlib.crc32(str(d).encode()): str(d).removeprefix("torch.") for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64,
    torch.complex128, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
    torch.bool)}


def agree_over_torch(tensor: torch.Tensor, op: str, weight: float,
                      weights: list[float] | None, group: Any, world_size: int,
                      timeout: float | None) -> None:
    """Without a shared-memory segment (several hosts, op unavailable): one all-gather
    of every rank's description, waited for at most ``timeout`` seconds, then the same
    verdict on every rank. A mismatch passed on to gloo would hang or abort a rank."""
    listed = zlib.crc32(struct.pack(f"{len(weights)}f", *weights)) if weights else 0
    bits = struct.unpack("q", struct.pack("d", weight))[0]
    mine = torch.tensor([tensor.numel(), zlib.crc32(str(tensor.dtype).encode()),
                         OP_CODES[op], listed, bits], dtype=torch.int64)
    everyone = torch.empty(world_size * mine.numel(), dtype=torch.int64)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(everyone, mine, group=group, async_op=True)
    limit = default_timeout() if timeout is None else timeout
    try:
        work.wait(timeout=timedelta(seconds=limit))
    except RuntimeError as exc:
        raise CommError(f"spd_ext all_reduce: a peer did not arrive within {limit:g} s "
                        f"({str(exc).splitlines()[0]}); it is stuck, slower than the timeout, "
                        "or skipped this collective. Raise the limit with all_reduce("
                        "timeout=...) or SPD_EXT_COMM_TIMEOUT") from None
    rows = everyone.view(world_size, -1).tolist()
    names = [f"rank {r} {n} x {_DTYPE_NAMES.get(d, '?')} "
             f"({next(k for k, v in OP_CODES.items() if v == o)})"
             for r, (n, d, o, _, _) in enumerate(rows)]
    if any(row[:3] != rows[0][:3] for row in rows):
        raise CommError("spd_ext all_reduce: ranks passed different tensors: "
                        + ", ".join(names) + "; every rank must pass a tensor of the same "
                        "size and dtype with the same op")
    if op != "weighted":
        return
    own = [struct.unpack("d", struct.pack("q", row[4]))[0] for row in rows]
    if len({row[3] for row in rows if row[3]}) > 1:
        raise CommError(f"spd_ext all_reduce: ranks passed different weight lists (each "
                        f"rank's own weight: {own}); the sum would be one no rank intended. "
                        "Pass the same list on every rank (weights=), or each rank's own "
                        "weight as weight=")
    limit_value = torch.finfo(tensor.dtype).max if tensor.is_floating_point() else math.inf
    for r, w in enumerate(own):
        if not math.isfinite(w) or abs(w) > limit_value:
            raise CommError(f"spd_ext all_reduce: rank {r}'s weight {w} is not a finite "
                            f"{str(tensor.dtype).removeprefix('torch.')} value; the weighted "
                            "sum would overflow. Use "
                            "weights that sum to 1")


def torch_all_reduce(tensor: torch.Tensor, op: str, weight: float | torch.Tensor,
                      world_size: int, group: Any, async_op: bool = False,
                      result: torch.Tensor | None = None) -> AllReduceWork | None:
    """Through torch.distributed; with ``async_op``, torch's own Work behind the handle.
    ``result``: the tensor the caller asked to reduce, if ``tensor`` is a contiguous
    copy of it (written back on completion)."""
    # Low-precision CPU sums go through fp32 so the fallback accumulates like the kernel.
    work = tensor.float() if (tensor.device.type == "cpu" and tensor.dtype in
                              (torch.bfloat16, torch.float16)) else tensor
    reduce_op = dist.ReduceOp.SUM
    if op == "weighted":
        if isinstance(weight, torch.Tensor):  # NCCL reads the factor as the tensor's dtype
            weight = weight.to(work.dtype)
        reduce_op = premul_sum(weight, group)
        if reduce_op is None:
            work.mul_(weight)
            reduce_op = dist.ReduceOp.SUM
    handle = dist.all_reduce(work, op=reduce_op, group=group, async_op=True)

    def finish(_: Any = None) -> torch.Tensor:
        if op == "mean":
            if work.is_floating_point():
                work.div_(world_size)
            else:
                work.floor_divide_(world_size)
        if work is not tensor:
            tensor.copy_(work)
        else:  # torch.distributed writes in place without telling autograd; the kernel does
            increment_version(tensor)
        if result is not None:
            result.copy_(tensor)
        return tensor if result is None else result

    if not async_op:
        handle.wait()
        finish()
        return None
    out = tensor if result is None else result
    return AllReduceWork(out, handle.get_future().then(finish))


#: Per group, held weakly (a strong reference would keep a destroyed group alive; see
#: GroupRegistry).
_CALLERS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()


@contextmanager
def one_caller(group: Any) -> Iterator[None]:
    """Refuse a second thread's call on a group while one is in flight (the kernel does
    the same in C++): the two threads' calls would pair with different calls on other
    ranks, mixing results silently."""
    lock = _CALLERS.setdefault(group_key(group), threading.Lock())
    if not lock.acquire(blocking=False):
        raise CommError("spd_ext all_reduce: two threads called all_reduce on the same "
                        "process group at once; their calls would pair with different calls "
                        "on other ranks. Give each thread its own process group "
                        "(torch.distributed.new_group) or call from one thread")
    try:
        yield
    finally:
        lock.release()
