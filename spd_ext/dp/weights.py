"""Signals of all ranks -> aggregation weights that sum to 1.

Every map shares the same post-processing: a uniform warm-up for the first
``warmup_steps`` steps, a floor (``w_i >= floor`` via w = floor + (1 - N floor) w'), and
EMA smoothing of the weights across steps. All ranks feed the same gathered signals
through the same code, so they agree on the weights exactly.
"""

from __future__ import annotations

import math


class WeightMap:
    name = ""

    def __init__(self, floor: float = 0.0, ema: float = 0.0, warmup_steps: int = 0) -> None:
        if floor < 0.0:
            raise ValueError(f"floor must be >= 0, got {floor}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"weight ema must be in [0, 1), got {ema}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.floor, self.ema, self.warmup_steps = floor, ema, warmup_steps
        self._previous: list[float] | None = None

    def raw_weights(self, values: list[float], higher_is_better: bool) -> list[float]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"previous": self._previous}

    def load_state_dict(self, state: dict) -> None:
        self._previous = state["previous"]

    def __call__(self, values: list[float], step: int, higher_is_better: bool) -> list[float]:
        n = len(values)
        if self.floor * n > 1.0 + 1e-12:
            raise ValueError(f"floor {self.floor} leaves no room for {n} ranks: need floor <= "
                             f"1/{n} = {1 / n:.4g}")
        if step < self.warmup_steps:
            w = [1.0 / n] * n
        else:
            w = self.raw_weights(values, higher_is_better)
        w = [self.floor + (1.0 - n * self.floor) * x for x in w]
        if self._previous is not None and self.ema > 0.0 and step >= self.warmup_steps:
            w = [self.ema * p + (1.0 - self.ema) * x for p, x in zip(self._previous, w)]
        total = sum(w)
        w = [x / total for x in w]
        self._previous = w
        return w


class SoftmaxWeights(WeightMap):
    """w = softmax(score / temperature), score = signal (negated when lower is better)."""

    name = "softmax"

    def __init__(self, temperature: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def raw_weights(self, values: list[float], higher_is_better: bool) -> list[float]:
        scores = [(v if higher_is_better else -v) / self.temperature for v in values]
        top = max(scores)
        e = [math.exp(s - top) for s in scores]
        return [x / sum(e) for x in e]


class InverseWeights(WeightMap):
    """w proportional to 1 / signal, for lower-is-better signals (inverse-loss weighting)."""

    name = "inverse"

    def raw_weights(self, values: list[float], higher_is_better: bool) -> list[float]:
        if higher_is_better:
            raise ValueError("inverse weighting needs a lower-is-better signal such as loss_ema")
        if any(v <= 0.0 for v in values):
            raise ValueError(f"inverse weighting needs positive signals, got {values}")
        inv = [1.0 / v for v in values]
        return [x / sum(inv) for x in inv]


WEIGHT_MAPS: dict[str, type[WeightMap]] = {cls.name: cls for cls in (SoftmaxWeights,
                                                                      InverseWeights)}


def make_weight_map(name: str, **kwargs) -> WeightMap:
    try:
        cls = WEIGHT_MAPS[name]
    except KeyError:
        raise ValueError(f"unknown weighting {name!r}; use one of {', '.join(WEIGHT_MAPS)}") \
            from None
    return cls(**kwargs)
