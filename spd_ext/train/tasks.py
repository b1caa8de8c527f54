"""The synthetic task: XOR made linearly separable by polynomial features.

x ~ N(0, 1)^d, label y = (x0 > 0) XOR (x1 > 0) (flipped with probability ``noise``);
features [x, x0^2, x1^2, x0 * x1] let a linear classifier learn it (x0 * x1 < 0 exactly
when the label is 1). Each data-parallel rank samples batches from its own shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spd_ext.errors import UsageError


def xor_features(n: int, d: int = 8, noise: float = 0.05,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    if d < 2:
        raise UsageError(f"the XOR task needs d >= 2, got {d}")
    if not 0.0 <= noise <= 0.5:
        raise UsageError(f"label noise must be in [0, 0.5], got {noise}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).float()
    flip = torch.rand(n, generator=g) < noise
    y = torch.where(flip, 1.0 - y, y)
    features = torch.cat([x, x[:, :2] ** 2, (x[:, 0] * x[:, 1]).unsqueeze(1)], dim=1)
    return features, y


class LogisticRegression(nn.Module):
    """``model(x, y) -> (logits, loss)`` like the GPTs, so every trainer handles it."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor,
                y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.linear(x).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, y) if y is not None else None
        return logits, loss


class XORTask:
    """Shards of one synthetic data set; ``sampler(rank, world)`` serves a rank's batches."""

    def __init__(self, n: int = 20_000, d: int = 8, noise: float = 0.05, seed: int = 0,
                 batch_size: int = 64) -> None:
        self.x, self.y = xor_features(n, d, noise, seed)
        self.val_x, self.val_y = xor_features(4_000, d, noise, seed + 1)
        self.batch_size, self.seed = batch_size, seed

    @property
    def features(self) -> int:
        return self.x.shape[1]

    def model(self) -> LogisticRegression:
        return LogisticRegression(self.features)

    def sampler(self, rank: int, world: int):
        per = len(self.x) // world
        xs, ys = self.x[rank * per:(rank + 1) * per], self.y[rank * per:(rank + 1) * per]

        def batches(split: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
            if split != "train":
                return self.val_x, self.val_y
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 997 + rank)
            idx = torch.randint(per, (self.batch_size,), generator=g)
            return xs[idx], ys[idx]

        return batches
