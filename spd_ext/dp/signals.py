"""Per-rank trust signals (scalars), updated online from the rank's own training.

A signal sees this step's loss before the weights are computed, and this rank's local
gradient (before aggregation) after: gradient-based signals therefore act one step late,
by design (weights for step t use signals through t-1 plus the current
loss). Gradients arrive in pieces (DDP buckets, or one flat buffer), each with the same
piece of the previous global gradient.

Every value stays a float64 tensor on the device of what the signal is shown (the loss,
the gradient): a GPU step never waits for the host to read a signal. A non-finite loss
leaves a signal as it was; a signal with nothing to report yet (``loss_ema`` before its
first loss) reports NaN, which the aggregator refuses.
"""

from __future__ import annotations

import torch

from spd_ext.errors import UsageError


def _scalar(value: torch.Tensor | float) -> torch.Tensor:
    """``value`` as a 0-d float64 tensor (a tensor stays on its device)."""
    return torch.as_tensor(value, dtype=torch.float64).detach().reshape(())


def _ema(old: torch.Tensor | None, x: torch.Tensor, beta: float,
         accept: torch.Tensor) -> torch.Tensor:
    """``old`` moved toward ``x`` (``x`` itself while ``old`` is None or NaN: no value
    yet), where ``accept``; ``old`` elsewhere. On the device, without branching on values."""
    old = old.to(x.device) if old is not None else torch.full_like(x, float("nan"))
    new = torch.where(torch.isnan(old), x, beta * old + (1 - beta) * x)
    return torch.where(accept, new, old)


class Signal:
    name: str = ""
    higher_is_better: bool = True
    #: whether it reads the rank's own gradient (which ZeRO-2/3 never hold whole)
    observes_gradients: bool = False
    needs_previous_global: bool = False
    _state: tuple[str, ...] = ()  # the attributes a checkpoint carries (tensors, None)

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in self._state}

    def load_state_dict(self, state: dict) -> None:
        for key in self._state:
            value = state[key]
            setattr(self, key, None if value is None else torch.as_tensor(
                value, dtype=torch.float64).clone())

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        pass

    def begin_gradient(self) -> None:
        pass

    def observe_gradient_piece(self, local: torch.Tensor,
                               previous_global: torch.Tensor | None) -> None:
        pass

    def end_gradient(self) -> None:
        pass

    def raw(self) -> torch.Tensor:
        """The measured quantity (what ranks exchange), a 0-d float64 tensor."""
        raise NotImplementedError


class LossEMA(Signal):
    """EMA of the training loss; lower loss, more trust."""

    name = "loss_ema"
    higher_is_better = False
    _state = ("value",)

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise UsageError(f"loss_ema beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.value: torch.Tensor | None = None  # NaN until a finite loss arrived

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        loss = _scalar(loss)
        self.value = _ema(self.value, loss, self.beta, torch.isfinite(loss))

    def raw(self) -> torch.Tensor:
        return _scalar(float("nan")) if self.value is None else self.value


class GradNormStability(Signal):
    """mean / std of this rank's recent gradient norms; steadier gradients, more trust."""

    name = "grad_norm_stability"
    observes_gradients = True
    _state = ("norms",)

    def __init__(self, window: int = 20) -> None:
        if window < 2:
            raise UsageError(f"grad_norm_stability window must be at least 2, got {window}")
        self.window = window
        self.norms: torch.Tensor | None = None  # the last <= window norms, oldest first
        self._sq: torch.Tensor | None = None

    def begin_gradient(self) -> None:
        self._sq = None

    def observe_gradient_piece(self, local: torch.Tensor,
                               previous_global: torch.Tensor | None) -> None:
        sq = local.detach().double().pow(2).sum()
        self._sq = sq if self._sq is None else self._sq + sq

    def end_gradient(self) -> None:
        if self._sq is None:
            return
        norm = self._sq.sqrt().reshape(1)
        kept = self.norms.to(norm.device) if self.norms is not None else norm[:0]
        self.norms = torch.cat([kept, norm])[-self.window:]

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.norms is not None:
            self.norms = self.norms.reshape(-1)[-self.window:]

    def raw(self) -> torch.Tensor:
        if self.norms is None or self.norms.numel() < 2:
            return _scalar(1.0)  # no history yet: every rank alike
        mean, std = self.norms.mean(), self.norms.std()
        return mean / (std + 1e-12 * mean.clamp(min=1e-30))


class CosineToPrevGlobal(Signal):
    """EMA of cos(local gradient, previous global gradient); aligned ranks, more trust."""

    name = "cosine_to_prev_global"
    observes_gradients = True
    needs_previous_global = True
    _state = ("value",)

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise UsageError(f"cosine_to_prev_global beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.value: torch.Tensor | None = None  # NaN until a first comparison
        self._sums: torch.Tensor | None = None  # a.b, a.a, b.b over the pieces

    def begin_gradient(self) -> None:
        self._sums = None

    def observe_gradient_piece(self, local: torch.Tensor,
                               previous_global: torch.Tensor | None) -> None:
        if previous_global is None:
            return
        a, b = local.detach().double(), previous_global.double()
        sums = torch.stack([a @ b, a @ a, b @ b])
        self._sums = sums if self._sums is None else self._sums + sums

    def end_gradient(self) -> None:
        if self._sums is None:
            return  # first step: nothing to compare with
        dot, local, prev = self._sums.unbind()
        cos = dot / (local * prev).sqrt().clamp(min=1e-300)
        compared = (local > 0) & (prev > 0) & torch.isfinite(cos)
        self.value = _ema(self.value, cos, self.beta, compared)

    def raw(self) -> torch.Tensor:
        if self.value is None:
            return _scalar(0.0)
        return torch.nan_to_num(self.value, nan=0.0)


SIGNALS: dict[str, type[Signal]] = {
    cls.name: cls for cls in (LossEMA, GradNormStability, CosineToPrevGlobal)}


def make_signal(name: str, **kwargs) -> Signal:
    try:
        cls = SIGNALS[name]
    except KeyError:
        raise UsageError(f"unknown signal {name!r}; use one of {', '.join(SIGNALS)}") from None
    return cls(**kwargs)
