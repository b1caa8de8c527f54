"""Signal-aware gradient aggregation: g = sum_i w_i g_i with weights from online signals.

Per step, every rank:
1. feeds its current loss to its signal and all-gathers the signal scalars (one small
   collective), so all ranks compute the same weights;
2. refuses the step (raises, gradients untouched) if the weights are not finite;
3. reduces its gradients with one weighted all-reduce through spd_ext.comm (the fused
   shared-memory kernel on one host, NCCL PREMUL_SUM on GPUs, pre-scale + sum otherwise);
4. shows its local gradient (before reduction) to gradient-based signals, for next step.

``reduce(model, step, loss)`` does it all for code without DDP (one flat buffer);
spd_ext.dp.hooks drives the same aggregator from a DDP comm hook, bucket by bucket.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from spd_ext.comm import all_reduce
from spd_ext.comm.buckets import copy_back, flatten
from spd_ext.dp.signals import make_signal
from spd_ext.dp.weights import check_floor, make_weight_map
from spd_ext.errors import UsageError
from spd_ext.hooks import TrainerHooks


class WeightError(RuntimeError):
    """The aggregation weights of a step are unusable (NaN or inf); the step is refused."""


def gather_signals(value: torch.Tensor, rank: int, world_size: int,
                   group: Any = None) -> torch.Tensor:
    """Every rank's scalar (collective), as a float64 tensor on ``value``'s device, with no
    host synchronization: one all-reduce of a small fp32 vector where each rank writes its
    value, split into an fp32 head and tail (48 bits in all), into its own slots and zeros
    elsewhere, so the sum is exact. On one host that is spd_ext's shared-memory kernel
    (microseconds) rather than a gloo all-gather (about a millisecond). NaN and inf arrive
    as themselves."""
    value = value.detach().double().reshape(())
    slots = torch.zeros(2 * world_size, dtype=torch.float32, device=value.device)
    head = value.float()
    slots[2 * rank] = head
    slots[2 * rank + 1] = torch.where(torch.isfinite(value), value - head.double(), 0.0).float()
    all_reduce(slots, "sum", group=group)
    pairs = slots.double().view(world_size, 2)
    return torch.where(torch.isfinite(pairs[:, 0]), pairs.sum(1), pairs[:, 0])


def gather_scalars(value: float, rank: int, world_size: int, group: Any = None) -> list[float]:
    """Every rank's float (collective; read on the host)."""
    return gather_signals(torch.tensor(value, dtype=torch.float64), rank, world_size,
                          group).tolist()


def local_gradients(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


class GradientAggregator(TrainerHooks, Protocol):
    """Combines the ranks' gradients: ``reduce(model, step, loss)`` replaces every
    gradient of ``model`` with the combination over ranks and returns what to log. As
    Trainer hooks, it reduces after backward."""

    def reduce(self, model: nn.Module, step: int, loss: float) -> dict:
        """Replace ``model``'s gradients with their combination over the ranks (collective)."""
        raise NotImplementedError

    def after_backward(self, model: nn.Module, step: int, loss: float) -> dict:
        return self.reduce(model, step, loss)


class MeanAggregator(GradientAggregator):
    """Plain data parallelism, g = (1/N) sum_i g_i: the uniform baseline (one all-reduce)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def reduce(self, model: nn.Module, step: int, loss: float) -> dict:
        grads = local_gradients(model)
        flat = flatten(grads)
        all_reduce(flat, "mean", group=self.group)
        copy_back(flat, grads)
        return {}


class SignalWeightedAggregator(GradientAggregator):
    def __init__(self, signal: str = "loss_ema", weighting: str = "softmax", *,
                 temperature: float = 1.0, floor: float = 0.05, ema: float = 0.0,
                 warmup_steps: int = 10, signal_args: dict | None = None, group: Any = None,
                 record: bool = False) -> None:
        if not dist.is_initialized():
            raise RuntimeError("SignalWeightedAggregator needs torch.distributed initialized")
        self.signal = make_signal(signal, **(signal_args or {}))
        map_args = dict(floor=floor, ema=ema, warmup_steps=warmup_steps)
        if weighting == "softmax":
            map_args["temperature"] = temperature
        self.weight_map = make_weight_map(weighting, **map_args)
        if weighting == "inverse" and self.signal.higher_is_better:
            raise UsageError(f"inverse weighting needs a lower-is-better signal (loss_ema), "
                             f"not {signal}")
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        check_floor(floor, self.world_size)
        self.record = record
        self.history: list[dict] = []
        self.last: dict = {}
        self._previous_global: dict[int, torch.Tensor] = {}

    # -- weights ------------------------------------------------------------------
    def compute_weights(self, step: int, loss: float | torch.Tensor) -> list[float]:
        """All ranks' weights for this step (collective: one scalar all-gather), the signal
        having observed this step's ``loss``.

        A non-finite loss on any rank makes every rank refuse the step with WeightError
        (they all see the same gathered values), before any gradient is touched.
        """
        self.signal.observe_loss(loss)  # a non-finite loss leaves the signal as it was
        self._gather_and_weigh(step, self._raw_unless_non_finite(loss), loss)
        return self.checked_weights()

    def weights_before_backward(self, step: int,
                                loss_estimate: float | torch.Tensor) -> torch.Tensor:
        """All ranks' weights for this step (collective), decided before its backward: the
        signal as it would be after observing ``loss_estimate`` (the step's first
        micro-batch loss), without committing it; :meth:`end_step` commits the step's
        loss. With one micro-batch per step this is exactly :meth:`compute_weights`.
        Computed on the device and not checked: a non-finite loss or signal gives
        non-finite weights, which :meth:`checked_weights` refuses when it reads them."""
        saved = self.signal.state_dict()
        self.signal.observe_loss(loss_estimate)
        raw = self._raw_unless_non_finite(loss_estimate)
        self.signal.load_state_dict(saved)
        return self._gather_and_weigh(step, raw, loss_estimate)

    def end_step(self, loss: float | torch.Tensor) -> None:
        """The step's loss (the mean over its micro-batches) enters the signal."""
        self.signal.observe_loss(loss)

    def _raw_unless_non_finite(self, loss: float | torch.Tensor) -> torch.Tensor:
        """The signal, NaN where the loss is not finite, on the loss's device (a signal
        with no history yet is a host constant; the gather runs where the loss is: NCCL
        reduces GPU tensors only)."""
        loss = torch.as_tensor(loss, dtype=torch.float64)
        raw = self.signal.raw().to(loss.device)
        return torch.where(torch.isfinite(loss), raw, float("nan"))

    def _gather_and_weigh(self, step: int, raw: torch.Tensor,
                          loss: float | torch.Tensor) -> torch.Tensor:
        signals = gather_signals(raw, self.rank, self.world_size, self.group)
        weights = self.weight_map(signals, step, self.signal.higher_is_better)
        self.last = {"step": step, "signals": signals, "weights": weights, "loss": loss}
        return weights

    def checked_weights(self) -> list[float]:
        """The last weights, read on the host (a synchronization); WeightError on every
        rank alike if a signal or a weight is not finite (the step is refused)."""
        step = self.last["step"]
        signals = self.last["signals"].tolist()
        bad = [r for r, s in enumerate(signals) if not math.isfinite(s)]
        if bad:
            raise WeightError(f"step {step}: ranks {bad} report non-finite signals ({signals}; "
                              "a NaN or inf loss?); the step is refused and no gradient was "
                              "changed")
        weights = self.last["weights"].tolist()
        if not all(math.isfinite(w) for w in weights):
            raise WeightError(f"step {step}: weights {weights} are not finite; the step is "
                              "refused and no gradient was changed")
        if self.record:
            self.history.append({**self.last, "signals": signals, "weights": weights,
                                 "loss": float(self.last["loss"])})
        return weights

    # -- gradients ----------------------------------------------------------------
    def observe_local_piece(self, index: int, local: torch.Tensor,
                            scale: float | torch.Tensor = 1.0) -> None:
        """This rank's own gradient, piece ``index``; ``scale``: what it was multiplied by
        (a loss scaled by the rank's weight), divided out before the signal sees it."""
        if not self.signal.observes_gradients:
            return
        if isinstance(scale, torch.Tensor) or scale != 1.0:
            local = local / scale
        self.signal.observe_gradient_piece(local, self._previous_global.get(index))

    def remember_global_piece(self, index: int, reduced: torch.Tensor) -> None:
        if self.signal.needs_previous_global:
            self._previous_global[index] = reduced.detach().clone()

    def reduce(self, model: nn.Module, step: int, loss: float) -> dict:
        """Replace every gradient of ``model`` with the weighted sum over ranks."""
        weights = self.compute_weights(step, loss)
        grads = local_gradients(model)
        flat = flatten(grads)
        self.signal.begin_gradient()
        self.observe_local_piece(0, flat)
        self.signal.end_gradient()
        all_reduce(flat, "weighted", weights=weights, group=self.group)
        self.refuse_non_finite(flat, grads, step)
        self.remember_global_piece(0, flat)
        copy_back(flat, grads)
        return {"weight": weights[self.rank], "weights": weights}

    def refuse_non_finite(self, reduced: torch.Tensor, local: list[torch.Tensor],
                          step: int) -> None:
        """A NaN or inf gradient on any rank (with a finite loss) makes the reduced buffer
        non-finite, identically on every rank: every rank then raises WeightError, naming
        the ranks whose own gradients were non-finite, before its gradients are touched.
        The check is one sum over the reduced buffer; naming the ranks costs a collective
        only when the step is refused."""
        if math.isfinite(float(reduced.sum(dtype=torch.float64))):
            return
        mine = 1.0 if all(bool(torch.isfinite(g).all()) for g in local) else 0.0
        flags = gather_scalars(mine, self.rank, self.world_size, self.group)
        bad = [r for r, ok in enumerate(flags) if ok != 1.0]
        raise WeightError(f"step {step}: ranks {bad} have NaN or inf gradients (with finite "
                          "losses); the step is refused and no gradient was changed; lower "
                          "the learning rate or check those ranks' data")

    # -- checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state (plain data and tensors: loads with weights_only=True)."""
        return {"signal": self.signal.state_dict(), "weight_map": self.weight_map.state_dict(),
                "previous_global": dict(self._previous_global)}

    def load_state_dict(self, state: dict) -> None:
        self.signal.load_state_dict(state["signal"])
        self.weight_map.load_state_dict(state["weight_map"])
        self._previous_global = dict(state["previous_global"])
