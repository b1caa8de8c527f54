"""The key/value cache of KV-cached generation: one preallocated buffer pair per block.

Each block caches the keys and values of its own heads on this rank (every shard's when
emulated), computed from the stream the block read, so a block inside an open region
(``parallel``) caches its rank-local view exactly as a full forward would compute it.
Attention is causal and every other operation is per position, so a forward over new
positions that reads the cached ones computes what the uncached forward computes there.
"""

from __future__ import annotations

import torch

from spd_ext.errors import UsageError


class LayerKVCache:
    """Keys and values of one block, ``[S * B, local heads, max_len, head_dim]``."""

    def __init__(self, rows: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.k = torch.empty(rows, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values; return every cached position's."""
        start, t = self.length, k.shape[2]
        if start + t > self.max_len:
            raise UsageError(f"the KV cache holds {self.max_len} positions; {start} are used "
                             f"and {t} more do not fit")
        self.k[:, :, start:start + t] = k
        self.v[:, :, start:start + t] = v
        self.length = start + t
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class KVCache:
    """A model's cache: one LayerKVCache per block, all at the same length."""

    def __init__(self, layers: list[LayerKVCache], batch_size: int) -> None:
        self.layers, self.batch_size = layers, batch_size

    @property
    def length(self) -> int:
        """Positions cached so far (the position of the next token)."""
        return self.layers[0].length if self.layers else 0


def causal_mask(new: int, cached: int, device: torch.device) -> torch.Tensor | None:
    """The attention mask of ``new`` queries that follow ``cached`` positions: query i sees
    keys 0..cached+i. None where no mask is needed (one query sees everything) or plain
    causal attention applies (nothing cached)."""
    if new == 1 or cached == 0:
        return None
    rows = torch.arange(new, device=device)[:, None] + cached
    return rows >= torch.arange(cached + new, device=device)[None, :]
