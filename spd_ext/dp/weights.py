"""Signals of all ranks -> aggregation weights that sum to 1.

Every map shares the same post-processing: a uniform warm-up for the first
``warmup_steps`` steps, a floor (``w_i >= floor`` via w = floor + (1 - N floor) w'), and
EMA smoothing of the weights across steps. All ranks feed the same gathered signals
through the same code, so they agree on the weights exactly.
"""

from __future__ import annotations

import torch

from spd_ext.errors import UsageError


def check_floor(floor: float, ranks: int, what: str = "floor", ranks_are: str = "ranks",
                hint: str = "") -> None:
    """Every weight is at least the floor and they sum to 1: at most 1/ranks."""
    if floor * ranks > 1.0 + 1e-12:
        raise UsageError(f"{what} {floor} leaves no room for {ranks} {ranks_are} (every weight "
                         f"is at least the floor and they sum to 1): use {what} <= 1/{ranks} "
                         f"= {1 / ranks:.4g}{hint}")


class WeightMap:
    name = ""

    def __init__(self, floor: float = 0.0, ema: float = 0.0, warmup_steps: int = 0) -> None:
        if floor < 0.0:
            raise UsageError(f"floor must be >= 0, got {floor}")
        if not 0.0 <= ema < 1.0:
            raise UsageError(f"weight ema must be in [0, 1), got {ema}")
        if warmup_steps < 0:
            raise UsageError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.floor, self.ema, self.warmup_steps = floor, ema, warmup_steps
        self._previous: torch.Tensor | None = None

    def raw_weights(self, values: torch.Tensor, higher_is_better: bool) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"previous": self._previous}

    def load_state_dict(self, state: dict) -> None:
        previous = state["previous"]
        self._previous = None if previous is None else torch.as_tensor(
            previous, dtype=torch.float64).clone()

    def __call__(self, values: torch.Tensor | list[float], step: int,
                 higher_is_better: bool) -> torch.Tensor:
        """The ranks' weights (float64 tensor on ``values``' device) from their signals;
        computed on the device: non-finite signals give non-finite weights, for the caller
        to refuse when it reads them."""
        values = torch.as_tensor(values, dtype=torch.float64)
        n = values.numel()
        check_floor(self.floor, n)
        if step < self.warmup_steps:
            # uniform, yet non-finite where a signal is (a NaN loss is refused in warm-up too)
            w = torch.full_like(values, 1.0 / n) + values * 0.0
        else:
            w = self.raw_weights(values, higher_is_better)
        w = self.floor + (1.0 - n * self.floor) * w
        if self._previous is not None and self.ema > 0.0 and step >= self.warmup_steps:
            w = self.ema * self._previous.to(w.device) + (1.0 - self.ema) * w
        w = w / w.sum()
        # a refused step (non-finite weights) leaves the EMA's memory as it was
        self._previous = w if self._previous is None else torch.where(
            torch.isfinite(w).all(), w, self._previous.to(w.device))
        return w


class SoftmaxWeights(WeightMap):
    """w = softmax(score / temperature), score = signal (negated when lower is better)."""

    name = "softmax"

    def __init__(self, temperature: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not temperature > 0.0:
            raise UsageError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def raw_weights(self, values: torch.Tensor, higher_is_better: bool) -> torch.Tensor:
        scores = (values if higher_is_better else -values) / self.temperature
        return torch.softmax(scores, dim=0)


class InverseWeights(WeightMap):
    """w proportional to 1 / signal, for lower-is-better signals (inverse-loss weighting).
    A signal <= 0 gives NaN weights (refused by the aggregator)."""

    name = "inverse"

    def raw_weights(self, values: torch.Tensor, higher_is_better: bool) -> torch.Tensor:
        if higher_is_better:
            raise UsageError("inverse weighting needs a lower-is-better signal such as loss_ema")
        inv = torch.where(values > 0, 1.0 / values, float("nan"))
        return inv / inv.sum()


WEIGHT_MAPS: dict[str, type[WeightMap]] = {cls.name: cls for cls in (SoftmaxWeights,
                                                                      InverseWeights)}


def make_weight_map(name: str, **kwargs) -> WeightMap:
    try:
        cls = WEIGHT_MAPS[name]
    except KeyError:
        raise UsageError(f"unknown weighting {name!r}; use one of {', '.join(WEIGHT_MAPS)}") \
            from None
    return cls(**kwargs)
