"""The residual stream under tensor parallelism: replicated base plus an open region.

A sync region starts the first time a block asks for the rank-local view of a closed
stream (copy-to-region of ``base``) and ends at ``close()``:

    base <- base + AR(sum of rank-local deltas added in the region) + replicated biases

Between the two the stream is *open*: the rank-local view is ``copy(base) + delta``,
which is what a ``parallel`` block keeps building on. Row-parallel biases are collected
and added once, after the sum, never to a rank-local view. ``close_async()`` launches the
all-reduce and leaves its result *pending*; it joins ``base`` at ``settle()`` (the Ladder
residual: the next module runs on the stream without it).

``to_tensors()`` / ``from_tensors()`` carry the stream, open region and pending all-reduce
included, across a boundary that passes tensors only (a pipeline stage's, an activation
checkpoint's), so that the model computes and syncs the same on either side of it.
"""

from __future__ import annotations

import torch

from spd_ext.errors import UsageError
from spd_ext.tp.communicator import Handle, TensorParallelComm
from spd_ext.tp.regions import (
    copy_to_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region_async,
)


class ResidualStream:
    def __init__(self, x: torch.Tensor, comm: TensorParallelComm) -> None:
        self.base = x  # [B, T, C], identical on every rank
        self.comm = comm
        self._local_base: torch.Tensor | None = None  # copy-to-region of base: region open
        self._delta: torch.Tensor | None = None  # [S, B, T, C] rank-local
        self._bias: torch.Tensor | None = None  # replicated, added at close
        self._pending: tuple[Handle, torch.Tensor | None] | None = None

    def local(self, settle: bool = True) -> torch.Tensor:
        """The rank-local view [S, B, T, C]; opens a region if none is open.

        ``settle=False`` (Ladder) leaves a pending all-reduce out of the view.
        """
        if settle:
            self.settle()
        if self._local_base is None:
            self._local_base = copy_to_tensor_parallel_region(self.base, self.comm)
        return self._local_base if self._delta is None else self._local_base + self._delta

    def add(self, delta: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Accumulate a rank-local contribution (and its replicated bias, for the close)."""
        if self._local_base is None:
            raise RuntimeError("add() needs an open region: compute the delta from local()")
        self._delta = delta if self._delta is None else self._delta + delta
        if bias is not None:
            self._bias = bias if self._bias is None else self._bias + bias

    def _take_region(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        delta, bias = self._delta, self._bias
        self._local_base = self._delta = self._bias = None
        return delta, bias

    def close(self) -> None:
        """End the region with one forward all-reduce of its deltas."""
        self.settle()
        delta, bias = self._take_region()
        if delta is not None:
            self.base = self.base + reduce_from_tensor_parallel_region(delta, self.comm)
        if bias is not None:
            self.base = self.base + bias

    def close_async(self) -> None:
        """Launch the region's all-reduce; its result joins ``base`` at the next settle()."""
        delta, bias = self._take_region()
        if delta is None:
            raise RuntimeError("close_async() on a region without contributions")
        self.settle()
        self._pending = (reduce_from_tensor_parallel_region_async(delta, self.comm), bias)

    def settle(self) -> None:
        if self._pending is not None:
            handle, bias = self._pending
            self._pending = None
            self.base = self.base + handle.wait()
            if bias is not None:
                self.base = self.base + bias

    #: the optional parts of a stream, after ``base``
    PARTS = ("local_base", "delta", "bias", "pending", "pending_bias")
    _MAX_DIM = 4  # a part's shape in the layout: [S, B, T, C] at most

    def to_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, layout)``: every part of the stream flattened into one tensor, and an
        int64 tensor of which parts are present and their shapes. A pending all-reduce is
        waited for (its sum stays out of ``base`` until the next settle(), as before);
        the region's rank-local base is passed as is, so its one backward all-reduce stays
        where the region opened. One tensor because a receiver's backward then reaches
        each autograd node once (one backward call per tensor would run the region's
        all-reduce once per part)."""
        pending = pending_bias = None
        if self._pending is not None:
            handle, pending_bias = self._pending
            pending = handle.wait()
        parts = [self.base, self._local_base, self._delta, self._bias, pending, pending_bias]
        present = [t for t in parts if t is not None]
        layout = [int(t is not None) for t in parts[1:]]
        for t in parts:
            shape = list(t.shape) if t is not None else []
            layout += shape + [-1] * (self._MAX_DIM - len(shape))
        values = own_gradient(torch.cat([t.reshape(-1) for t in present]))
        return values, torch.tensor(layout, dtype=torch.int64, device=values.device)

    @classmethod
    def from_tensors(cls, tensors: tuple[torch.Tensor, ...],
                     comm: TensorParallelComm) -> ResidualStream:
        """The stream ``to_tensors()`` packed, on the other side of the boundary."""
        n = len(cls.PARTS)
        if len(tensors) != 2 or tensors[1].numel() != n + (n + 1) * cls._MAX_DIM:
            raise UsageError(f"these {len(tensors)} tensors are not a residual stream's "
                             "to_tensors()")
        values, layout = tensors
        flags, dims = layout[:n].tolist(), layout[n:].tolist()
        shapes = [[d for d in dims[i * cls._MAX_DIM:(i + 1) * cls._MAX_DIM] if d >= 0]
                  for i in range(n + 1)]
        present = [True, *(bool(f) for f in flags)]
        sizes = [torch.Size(shape).numel() for shape, here in zip(shapes, present) if here]
        pieces = iter(values.split(sizes))
        parts = [next(pieces).view(shape) if here else None
                 for shape, here in zip(shapes, present)]
        stream = cls(parts[0], comm)
        stream._local_base, stream._delta, stream._bias = parts[1], parts[2], parts[3]
        if parts[4] is not None:
            stream._pending = (Handle(parts[4]), parts[5])
        return stream

    def finish(self) -> torch.Tensor:
        """The replicated stream, closing an open region with one final sync if needed."""
        self.close()
        return self.base


class _OwnGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clone()


def own_gradient(x: torch.Tensor) -> torch.Tensor:
    """``x``, whose gradient is copied on its way back. A pipeline receives a stage
    output's gradient into a buffer it reuses for the next micro-batch; without the copy,
    a parameter reached through views only (a bias packed in the stream) would keep a view
    of that buffer as its ``.grad`` (autograd's accumulation adopts a lone incoming
    gradient), and the next receive would overwrite it."""
    return _OwnGradient.apply(x)
