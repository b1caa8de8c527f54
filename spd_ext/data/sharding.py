"""Data-parallel shards of a TokenDataset, IID or with corrupted ranks.

Every rank trains on its own contiguous slice of the training tokens. In
``clean_vs_corrupt`` mode the ranks in ``corrupt_ranks`` see their batches corrupted;
validation batches are always clean (and the same on every rank).

Corruptions (``probability`` p, ``seed`` for their randomness):

- ``token_swap``:  each token is replaced by a uniformly random one with probability p
- ``shuffle``:     each window of ``window`` tokens is permuted with probability p
- ``label_noise``: each target is replaced by a random token with probability p (inputs
                   stay clean); ``shift`` targets by one position instead of randomizing
- ``duplicate``:   the rank samples only a small repeated subset of its shard: a
                   fraction p of its possible windows (at least one)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spd_ext.data.dataset import TokenDataset, windows
from spd_ext.errors import UsageError

CORRUPTIONS = ("token_swap", "shuffle", "label_noise", "duplicate")
SHARDINGS = ("iid", "clean_vs_corrupt")


@dataclass(frozen=True)
class Corruption:
    kind: str = "token_swap"
    probability: float = 0.3
    seed: int = 0
    window: int = 8  # shuffle: tokens per permuted window
    shift: bool = False  # label_noise: shift targets instead of randomizing them

    def __post_init__(self) -> None:
        if self.kind not in CORRUPTIONS:
            raise UsageError(f"unknown corruption {self.kind!r}; use one of "
                             f"{', '.join(CORRUPTIONS)}")
        if not 0.0 <= self.probability <= 1.0:
            raise UsageError(f"corruption probability must be in [0, 1], got {self.probability}")
        if self.window < 2:
            raise UsageError(f"shuffle window must be at least 2 tokens, got {self.window}")

    def apply(self, x: torch.Tensor, y: torch.Tensor, vocab: int,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probability
        if self.kind == "token_swap":  # corrupt the text itself: inputs and targets agree
            seq = torch.cat([x, y[:, -1:]], dim=1)
            mask = torch.rand(seq.shape, generator=g) < p
            seq = torch.where(mask, torch.randint(vocab, seq.shape, generator=g), seq)
            return seq[:, :-1], seq[:, 1:]
        if self.kind == "shuffle":
            seq = torch.cat([x, y[:, -1:]], dim=1)
            b, n = seq.shape
            w = self.window
            whole = n // w * w
            blocks = seq[:, :whole].reshape(b, -1, w)
            perm = torch.argsort(torch.rand(blocks.shape, generator=g), dim=-1)
            chosen = (torch.rand(blocks.shape[:2], generator=g) < p).unsqueeze(-1)
            blocks = torch.where(chosen, torch.gather(blocks, -1, perm), blocks)
            seq = torch.cat([blocks.reshape(b, whole), seq[:, whole:]], dim=1)
            return seq[:, :-1], seq[:, 1:]
        if self.kind == "label_noise":
            mask = torch.rand(y.shape, generator=g) < p
            noise = torch.roll(y, 1, dims=1) if self.shift else torch.randint(vocab, y.shape,
                                                                               generator=g)
            return x, torch.where(mask, noise, y)
        return x, y  # duplicate acts on sampling, not on tokens


class ShardedSampler:
    """``sampler(split, step) -> (x, y)`` for one data-parallel rank (see module docs)."""

    def __init__(self, data: TokenDataset, rank: int, world_size: int, batch_size: int,
                 block_size: int, seed: int, sharding: str = "iid",
                 corrupt_ranks: tuple[int, ...] = (), corruption: Corruption | None = None):
        if sharding not in SHARDINGS:
            raise UsageError(f"unknown sharding {sharding!r}; use one of {', '.join(SHARDINGS)}")
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} outside world of size {world_size}")
        bad = [r for r in corrupt_ranks if not 0 <= r < world_size]
        if bad:
            raise UsageError(f"corrupt ranks {bad} outside world of size {world_size}")
        if sharding == "clean_vs_corrupt" and (not corrupt_ranks or corruption is None):
            raise UsageError("clean_vs_corrupt needs corrupt_ranks and a corruption")
        self.data, self.rank, self.batch_size, self.block_size = data, rank, batch_size, block_size
        self.seed = seed
        train = data.split("train")
        per = len(train) // world_size
        self.shard = train[rank * per:(rank + 1) * per]
        if len(self.shard) <= block_size + 1:
            raise UsageError(f"rank {rank}'s shard has {len(self.shard)} tokens, too few for "
                             f"block_size {block_size}; use fewer ranks or a larger corpus")
        self.corruption = corruption if (sharding == "clean_vs_corrupt"
                                          and rank in corrupt_ranks) else None
        n_windows = len(self.shard) - block_size - 1
        self.starts: np.ndarray | None = None
        if self.corruption is not None and self.corruption.kind == "duplicate":
            g = np.random.default_rng(self.corruption.seed + rank)
            keep = max(1, int(n_windows * self.corruption.probability))
            self.starts = g.choice(n_windows, size=keep, replace=False)
        self.n_windows = n_windows

    @property
    def corrupted(self) -> bool:
        return self.corruption is not None

    def __call__(self, split: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if split != "train":  # validation: clean and identical on every rank
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 10**9 + step)
            return self.data.batch(split, self.batch_size, self.block_size, g)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 997 + self.rank)
        if self.starts is not None:
            pick = torch.randint(len(self.starts), (self.batch_size,), generator=g)
            starts = torch.from_numpy(self.starts[pick.numpy()])
        else:
            starts = torch.randint(self.n_windows, (self.batch_size,), generator=g)
        x, y = windows(self.shard, starts, self.block_size)
        if self.corruption is not None:
            cg = torch.Generator().manual_seed(self.corruption.seed * 7919 + step * 31 + self.rank)
            x, y = self.corruption.apply(x, y, self.data.vocab_size, cg)
        return x, y
