"""The interface every all-reduce backend implements, and the one call they are given.

Three backends carry ``spd_ext.comm.all_reduce``: the shared-memory kernel
(:class:`~spd_ext.comm.shm.ShmGroup`, CPU ranks on one host), the CUDA IPC kernel
(:class:`~spd_ext.comm.cuda_ipc.IpcGroup`, 2-8 GPUs of one node) and torch.distributed
(:class:`~spd_ext.comm.torch_backend.TorchDistributedBackend`, everything else).
``all_reduce`` checks the arguments once, turns them into a :class:`ReduceCall` and picks
the backend (:func:`~spd_ext.comm.all_reduce.backend_for`); the backend reduces in place.

Where a setting chooses between spd_ext's collectives and another library's (tensor
parallelism's ``backend``, DeepSpeed's ``comm.backend``, the benchmarks' rows), spd_ext's
are named :data:`spd_ext.backend_names.SPD_EXT`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from spd_ext.comm.work import AllReduceWork


@dataclass
class ReduceCall:
    """One all-reduce, its arguments checked."""

    tensor: torch.Tensor  # what the caller passed: holds the result afterwards
    flat: torch.Tensor  # ``tensor``, or a contiguous copy of it (copied back at the end)
    op: str  # "sum", "mean" or "weighted"
    #: this rank's factor: 1 (sum), 1/N (mean) or its weight; for CUDA tensors with
    #: weights on the device, a 1-element CUDA tensor holding it (no host sync)
    factor: float | torch.Tensor
    #: ``weights=`` as passed (every rank's weights, or None): read through weight_list()
    #: only by backends that compare it across ranks (a CUDA tensor's would cost a sync)
    weights: torch.Tensor | Sequence[float] | None
    group: Any
    world_size: int
    timeout: float | None  # seconds to wait for a peer; None: the backend's default

    def weight_list(self) -> list[float] | None:
        """The weight list every rank must share, or None (none given)."""
        if self.op != "weighted" or self.weights is None:
            return None
        if isinstance(self.weights, torch.Tensor):
            return [float(w) for w in self.weights.reshape(-1).tolist()]
        return [float(w) for w in self.weights]

    def copy_back(self) -> None:
        if self.flat is not self.tensor:
            self.tensor.copy_(self.flat)


class AllReduceBackend(Protocol):
    """What ``all_reduce`` needs of a backend."""

    #: the path's name, as ``spd_ext.comm.path`` reports it
    name: ClassVar[str]

    def suits(self, tensor: torch.Tensor) -> bool:
        """Whether this backend's own kernel reduces ``tensor``; decided on what every rank
        shares (dtype, size), so every rank decides alike."""

    def all_reduce(self, call: ReduceCall, async_op: bool) -> AllReduceWork | None:
        """Reduce ``call.tensor`` in place; with ``async_op``, return at once with a handle
        (None otherwise). Raises :class:`~spd_ext.comm.groups.CommError` on every rank
        alike when the ranks' calls disagree."""

    def close(self) -> None:
        """Release what the backend holds for its group (segments, mappings, threads)."""
