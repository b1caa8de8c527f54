"""One flat buffer for many tensors, so a set of gradients costs one collective."""

from __future__ import annotations

import torch


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A new 1-D tensor holding every tensor's elements, in order."""
    return torch.cat([t.reshape(-1) for t in tensors])


def copy_back(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Inverse of flatten: write the buffer's slices back into the tensors."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
