"""Robust aggregation baselines: trimmed mean, coordinate-wise median, centered clipping.

They need every rank's whole gradient (an all-gather, N times the memory and traffic of
an all-reduce), which is why signal weighting, one weighted all-reduce, is the point of
comparison. ``RobustAggregator.reduce`` has the same interface as the signal-weighted one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spd_ext.comm.buckets import copy_back, flatten
from spd_ext.dp.aggregator import GradientAggregator, local_gradients
from spd_ext.errors import UsageError


def trimmed_mean(stacked: torch.Tensor, trim: int) -> torch.Tensor:
    """Per coordinate, drop the ``trim`` largest and smallest values, average the rest."""
    n = stacked.shape[0]
    if not 0 <= 2 * trim < n:
        raise UsageError(f"trimming {trim} from each side leaves nothing of {n} ranks")
    ordered = stacked.sort(dim=0).values
    return ordered[trim:n - trim].mean(0)


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """Per-coordinate median (the mean of the two middle values for an even count)."""
    ordered = stacked.sort(dim=0).values
    n = stacked.shape[0]
    return ordered[(n - 1) // 2:n // 2 + 1].mean(0)


def centered_clipping(stacked: torch.Tensor, center: torch.Tensor, tau: float,
                      iterations: int = 3) -> torch.Tensor:
    """Karimireddy et al. 2021: v <- v + mean_i clip(g_i - v, tau), from ``center``."""
    v = center.clone()
    for _ in range(iterations):
        diff = stacked - v
        norms = diff.norm(dim=1, keepdim=True).clamp_min(1e-12)
        v = v + (diff * (tau / norms).clamp(max=1.0)).mean(0)
    return v


ROBUST_METHODS = ("trimmed_mean", "median", "centered_clipping")


class RobustAggregator(GradientAggregator):
    def __init__(self, method: str = "trimmed_mean", *, trim: int = 1, tau: float = 1.0,
                 iterations: int = 3, group: Any = None) -> None:
        if method not in ROBUST_METHODS:
            raise UsageError(f"unknown robust method {method!r}; use one of "
                             f"{', '.join(ROBUST_METHODS)}")
        if tau <= 0:
            raise UsageError(f"tau must be > 0, got {tau}")
        self.method, self.trim, self.tau, self.iterations = method, trim, tau, iterations
        self.group = group
        self.world_size = dist.get_world_size(group)
        if method == "trimmed_mean" and not 0 <= 2 * trim < self.world_size:
            raise UsageError(f"trim={trim} from each side leaves nothing of {self.world_size} "
                             "ranks")
        self._previous: torch.Tensor | None = None

    def aggregate(self, stacked: torch.Tensor) -> torch.Tensor:
        if self.method == "trimmed_mean":
            return trimmed_mean(stacked, self.trim)
        if self.method == "median":
            return coordinate_median(stacked)
        center = self._previous if self._previous is not None else coordinate_median(stacked)
        return centered_clipping(stacked, center, self.tau, self.iterations)

    def reduce(self, model: nn.Module, step: int, loss: float) -> dict:
        grads = local_gradients(model)
        flat = flatten(grads)
        parts = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(parts, flat, group=self.group)
        result = self.aggregate(torch.stack(parts))
        self._previous = result
        copy_back(result, grads)
        return {}
