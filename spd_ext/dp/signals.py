"""Per-rank trust signals (scalars), updated online from the rank's own training.

A signal sees this step's loss before the weights are computed, and this rank's local
gradient (before aggregation) after: gradient-based signals therefore act one step late,
by design (weights for step t use signals through t-1 plus the current
loss). Gradients arrive in pieces (DDP buckets, or one flat buffer), each with the same
piece of the previous global gradient.
"""

from __future__ import annotations

import math
from collections import deque

import torch


class Signal:
    name: str = ""
    higher_is_better: bool = True
    #: whether it reads the rank's own gradient (which ZeRO-2/3 never hold whole)
    observes_gradients: bool = False
    needs_previous_global: bool = False
    _state: tuple[str, ...] = ()  # the attributes a checkpoint carries (plain data)

    def state_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, deque) else v)
                for k, v in ((k, getattr(self, k)) for k in self._state)}

    def load_state_dict(self, state: dict) -> None:
        for key in self._state:
            current = getattr(self, key)
            if isinstance(current, deque):
                current.clear()
                current.extend(state[key])
            else:
                setattr(self, key, state[key])

    def observe_loss(self, loss: float) -> None:
        pass

    def begin_gradient(self) -> None:
        pass

    def observe_gradient_piece(self, local: torch.Tensor,
                               previous_global: torch.Tensor | None) -> None:
        pass

    def end_gradient(self) -> None:
        pass

    def raw(self) -> float:
        """The measured quantity (what ranks exchange)."""
        raise NotImplementedError


class LossEMA(Signal):
    """EMA of the training loss; lower loss, more trust."""

    name = "loss_ema"
    higher_is_better = False
    _state = ("value",)

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"loss_ema beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.value: float | None = None

    def observe_loss(self, loss: float) -> None:
        self.value = loss if self.value is None else self.beta * self.value + (1 - self.beta) * loss

    def raw(self) -> float:
        return float("nan") if self.value is None else self.value


class GradNormStability(Signal):
    """mean / std of this rank's recent gradient norms; steadier gradients, more trust."""

    name = "grad_norm_stability"
    observes_gradients = True
    _state = ("norms",)

    def __init__(self, window: int = 20) -> None:
        if window < 2:
            raise ValueError(f"grad_norm_stability window must be at least 2, got {window}")
        self.norms: deque[float] = deque(maxlen=window)
        self._sq = 0.0

    def begin_gradient(self) -> None:
        self._sq = 0.0

    def observe_gradient_piece(self, local: torch.Tensor,
                               previous_global: torch.Tensor | None) -> None:
        self._sq += float(local.double().pow(2).sum())

    def end_gradient(self) -> None:
        self.norms.append(math.sqrt(self._sq))

    def raw(self) -> float:
        if len(self.norms) < 2:
            return 1.0  # no history yet: every rank alike
        mean = sum(self.norms) / len(self.norms)
        std = math.sqrt(sum((n - mean) ** 2 for n in self.norms) / (len(self.norms) - 1))
        return mean / (std + 1e-12 * max(mean, 1e-30))


class CosineToPrevGlobal(Signal):
    """EMA of cos(local gradient, previous global gradient); aligned ranks, more trust."""

    name = "cosine_to_prev_global"
    observes_gradients = True
    needs_previous_global = True
    _state = ("value",)

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"cosine_to_prev_global beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.value: float | None = None
        self._dot = self._local = self._prev = 0.0

    def begin_gradient(self) -> None:
        self._dot = self._local = self._prev = 0.0

    def observe_gradient_piece(self, local: torch.Tensor,
                               previous_global: torch.Tensor | None) -> None:
        if previous_global is None:
            return
        a, b = local.double(), previous_global.double()
        self._dot += float(a @ b)
        self._local += float(a @ a)
        self._prev += float(b @ b)

    def end_gradient(self) -> None:
        if self._local == 0.0 or self._prev == 0.0:
            return  # first step: nothing to compare with
        cos = self._dot / math.sqrt(self._local * self._prev)
        self.value = cos if self.value is None else self.beta * self.value + (1 - self.beta) * cos

    def raw(self) -> float:
        return 0.0 if self.value is None else self.value


SIGNALS: dict[str, type[Signal]] = {
    cls.name: cls for cls in (LossEMA, GradNormStability, CosineToPrevGlobal)}


def make_signal(name: str, **kwargs) -> Signal:
    try:
        cls = SIGNALS[name]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}; use one of {', '.join(SIGNALS)}") from None
    return cls(**kwargs)
