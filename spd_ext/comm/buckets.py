"""One flat buffer for many tensors, so a set of gradients costs one collective."""

from __future__ import annotations

import torch

from spd_ext.comm.torch_private import flatten_dense, unflatten_dense
from spd_ext.errors import UsageError


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A new 1-D tensor holding every tensor's elements, in order (torch's own helper)."""
    return flatten_dense(tensors)


def copy_back(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Inverse of flatten: write the buffer's slices back into the tensors."""
    for t, view in zip(tensors, unflatten_dense(flat, tensors)):
        t.copy_(view)


def shard_bounds(numel: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """Split ``range(numel)`` into ``parts`` contiguous ``(start, end)`` slices, as even as
    possible in units of ``align`` elements (every boundary but the last end is a multiple
    of ``align``, so blockwise work on a slice matches the same work on the whole)."""
    if parts < 1 or align < 1:
        raise UsageError(f"parts and align must be >= 1, got parts={parts} align={align}")
    units = -(-numel // align)
    base, extra = divmod(units, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = min(numel, start + (base + (i < extra)) * align)
        bounds.append((start, end))
        start = end
    return bounds
