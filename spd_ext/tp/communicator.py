"""How shards talk: emulated (all shards in one process) or distributed (one rank each).

Tensors that live on shards carry a leading shard dimension: T in the emulated mode,
1 in the distributed mode. Summing over it and then all-reducing over the group is the
tensor-parallel all-reduce in both modes (the all-reduce is a no-op when emulated), so
every layer is written once for both.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from spd_ext.backend_names import SPD_EXT, TP_BACKENDS, renamed_backend_hint
from spd_ext.comm.buckets import copy_back, flatten
from spd_ext.comm.library import group_key
from spd_ext.errors import UsageError
from spd_ext.tp.sync_counter import SyncCounter


class Handle:
    """An all-reduce in flight; ``wait()`` returns its (reduced) tensor. ``work`` is what
    the collective returned with ``async_op=True`` (spd_ext's ``AllReduceWork`` or
    torch.distributed's ``Work``), None when nothing is in flight."""

    def __init__(self, tensor: torch.Tensor, work: Any = None) -> None:
        self.tensor = tensor
        self.work = work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.tensor


class TensorParallelComm:
    """Shard bookkeeping and the all-reduce across shards of one tensor-parallel group."""

    def __init__(self, tp_size: int, shards: int, rank: int) -> None:
        if tp_size < 1:
            raise UsageError(f"tensor-parallel size must be at least 1, got {tp_size}")
        self.tp_size = tp_size
        self.shards = shards  # shard slices held by this process
        self.rank = rank  # first shard held here
        self.counter = SyncCounter()

    @property
    def emulated(self) -> bool:
        return self.shards == self.tp_size

    def all_reduce_(self, t: torch.Tensor) -> None:
        """Sum ``t`` (already summed over local shards) over the other processes."""
        raise NotImplementedError

    def all_reduce_async(self, t: torch.Tensor) -> Handle:
        self.all_reduce_(t)
        return Handle(t)

    def all_reduce_params_(self, tensors: list[torch.Tensor]) -> None:
        """Sum parameter gradients over the group (one flat buffer)."""
        raise NotImplementedError


class EmulatedComm(TensorParallelComm):
    """All T shards in this process: the shard-dimension sum is the whole all-reduce."""

    def __init__(self, tp_size: int) -> None:
        super().__init__(tp_size, shards=tp_size, rank=0)

    def all_reduce_(self, t: torch.Tensor) -> None:
        return None

    def all_reduce_params_(self, tensors: list[torch.Tensor]) -> None:
        return None  # autograd already summed the shards' contributions


class DistributedComm(TensorParallelComm):
    """One shard per rank of ``group``.

    ``backend="spd_ext"`` all-reduces through spd_ext.comm (shared memory on one host),
    ``"torch"`` through torch.distributed directly. Asynchronous all-reduces are the
    collectives' own (``async_op=True``); either back-end completes a group's calls in
    the order they were issued, so a synchronous one after them needs no extra wait.
    """

    def __init__(self, group: Any = None, backend: str = SPD_EXT) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DistributedComm needs torch.distributed initialized first")
        if backend not in TP_BACKENDS:
            raise UsageError(f"backend must be 'spd_ext' or 'torch', got {backend!r}"
                             + renamed_backend_hint(backend))
        super().__init__(dist.get_world_size(group), shards=1, rank=dist.get_rank(group))
        self.group = group
        self.backend = backend
        self._group_key = group_key(group)  # the group as spd_ext's operators name it

    def _reduce(self, t: torch.Tensor, async_op: bool = False) -> Any:
        # detach: the region's output is written in place outside autograd's view (its
        # backward does not read it)
        if torch.compiler.is_compiling():
            self._reduce_traced(t)
            return None  # compiled: synchronous (Inductor orders the graph's work itself)
        if self.backend == SPD_EXT:
            from spd_ext.comm import all_reduce

            return all_reduce(t.detach(), group=self.group, async_op=async_op)
        return dist.all_reduce(t.detach(), group=self.group, async_op=async_op)

    def _reduce_traced(self, t: torch.Tensor) -> None:
        """The all-reduce as operators torch.compile traces (a pybind call or a ``Work``
        would break the graph): spd_ext's, or torch's functional collective."""
        if self.backend == SPD_EXT:
            torch.ops.spd_ext.all_reduce_(t, "sum", self._group_key)
        else:
            from torch.distributed import _functional_collectives as funcol

            t.copy_(funcol.all_reduce(t, "sum", self.group or dist.group.WORLD))

    def all_reduce_(self, t: torch.Tensor) -> None:
        self._reduce(t)

    def all_reduce_async(self, t: torch.Tensor) -> Handle:
        return Handle(t, self._reduce(t, async_op=True))

    def all_reduce_params_(self, tensors: list[torch.Tensor]) -> None:
        if not tensors:
            return
        flat = flatten(tensors)
        self._reduce(flat)
        copy_back(flat, tensors)
