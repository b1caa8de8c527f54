"""Collective staleness modes: synchronous, delayed all-reduce, local SGD, DiLoCo.

Each strategy plugs into the Trainer: ``after_backward`` (gradient exchange; may ask the
trainer to skip the optimizer), ``after_step`` (parameter averaging) and ``finish``
(waits for collectives still in flight, so every rank shuts down cleanly).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spd_ext.comm import AllReduceWork, all_reduce
from spd_ext.comm.buckets import copy_back, flatten
from spd_ext.comm.groups import background_group
from spd_ext.dp.aggregator import local_gradients
from spd_ext.errors import UsageError
from spd_ext.hooks import TrainerHooks
from spd_ext.staleness.metrics import WorkerMetrics
from spd_ext.staleness.modes import Mode


class StalenessStrategy(TrainerHooks):
    def __init__(self, mode: Mode, group: Any = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(f"mode {mode} needs torch.distributed initialized")
        self.mode, self.group = mode, group
        self.metrics = WorkerMetrics(dist.get_rank(group))

    def _average_(self, tensors: list[torch.Tensor]) -> None:
        flat = flatten(tensors)
        start = time.perf_counter()
        all_reduce(flat, "mean", group=self.group)
        self.metrics.add_idle(time.perf_counter() - start)
        self.metrics.messages += 1
        copy_back(flat, tensors)

    def after_backward(self, model: nn.Module, step: int, loss: float) -> dict | None:
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        self.metrics.steps += 1

    def finish(self, model: nn.Module) -> None:
        pass

    def evaluation_weights(self, model: nn.Module) -> list[torch.Tensor]:
        """The weights that represent the job right now (collective on every rank; the
        model itself is left alone). Synchronous modes: the model's own."""
        return [p.detach().clone() for p in model.parameters()]

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly (plain data and tensors, so it
        loads with weights_only=True). Collective where collectives are in flight."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SynchronousSGD(StalenessStrategy):
    """``ssgd``: average the gradients every step."""

    def after_backward(self, model: nn.Module, step: int, loss: float) -> dict | None:
        self._average_(local_gradients(model))
        self.metrics.record_staleness(0)
        return None


class DelayedAllReduce(StalenessStrategy):
    """``delayed:k``: step t's averaged gradient is applied at step t+k.

    The all-reduce of step t is issued asynchronously and completes while steps
    t+1..t+k compute, so communication overlaps k steps of compute. The first k steps
    apply nothing (the optimizer is skipped); staleness is exactly k.
    """

    def __init__(self, mode: Mode, group: Any = None) -> None:
        super().__init__(mode, group)
        self.k = mode.value
        # The delayed all-reduces run on a group of their own, so the main thread's
        # calls on ``group`` meanwhile (the engine's NaN check, a user's metrics) need not
        # queue behind them.
        self._comm_group = background_group(group)
        self._in_flight: deque[tuple[int, torch.Tensor, Any]] = deque()

    def after_backward(self, model: nn.Module, step: int, loss: float) -> dict | None:
        grads = local_gradients(model)
        buffer = flatten(grads)
        work = all_reduce(buffer, "mean", group=self._comm_group, async_op=True)
        self._in_flight.append((step, buffer, work))
        self.metrics.messages += 1
        if len(self._in_flight) <= self.k:
            return {"skip_optimizer": True}
        issued, buffer, work = self._in_flight.popleft()
        start = time.perf_counter()
        work.wait()
        self.metrics.add_idle(time.perf_counter() - start)
        copy_back(buffer, grads)
        self.metrics.record_staleness(step - issued)
        return None

    def finish(self, model: nn.Module) -> None:
        while self._in_flight:  # every rank issued the same collectives: complete them all
            self._in_flight.popleft()[2].wait()

    def state_dict(self) -> dict:
        """The gradients in flight, completed (every rank waits for the same ones)."""
        for _, _, work in self._in_flight:
            work.wait()
        return {"in_flight": [(issued, buffer) for issued, buffer, _ in self._in_flight]}

    def load_state_dict(self, state: dict) -> None:
        self._in_flight.clear()
        for issued, buffer in state["in_flight"]:
            self._in_flight.append((issued, buffer, AllReduceWork.completed(buffer)))


class LocalSGD(StalenessStrategy):
    """``local_sgd:H``: local steps, parameters averaged after every H-th step (PyTorch's
    PeriodicModelAverager with warm-up H-1; averaged here through spd_ext.comm, and every
    parameter, with or without a gradient at that moment: a DeepSpeed engine has already
    released the gradients when its step returns)."""

    def __init__(self, mode: Mode, group: Any = None) -> None:
        super().__init__(mode, group)
        self.H = mode.value
        self._since_average = 0

    def after_step(self, model: nn.Module, step: int) -> None:
        super().after_step(model, step)
        if (step + 1) % self.H == 0:
            with torch.no_grad():
                self._average_(list(model.parameters()))
            self._since_average = 0
        else:
            self._since_average += 1
        self.metrics.record_staleness(self._since_average)

    def state_dict(self) -> dict:
        return {"since_average": self._since_average}

    def load_state_dict(self, state: dict) -> None:
        self._since_average = state["since_average"]

    def evaluation_weights(self, model: nn.Module) -> list[torch.Tensor]:
        weights = [p.detach().clone() for p in model.parameters()]
        flat = flatten(weights)
        all_reduce(flat, "mean", group=self.group)  # the average the next sync would make
        copy_back(flat, weights)
        return weights


class DiLoCo(StalenessStrategy):
    """``diloco:H`` (arXiv 2311.08105): H inner optimizer steps (the trainer's optimizer,
    AdamW by default), then an outer Nesterov SGD step on the averaged pseudo-gradient
    anchor - mean_i(theta_i), and every worker restarts from the new anchor.

    The outer step acts on ``self.weights(model)``: the model's parameters here; a
    subclass may point it at other tensors of the same values (ZeRO's fp32 master shards).
    """

    def __init__(self, mode: Mode, model: nn.Module, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, group: Any = None) -> None:
        super().__init__(mode, group)
        self.H = mode.value
        self.anchor = [w.detach().clone().requires_grad_(False) for w in self.weights(model)]
        self.outer = torch.optim.SGD(self.anchor, lr=outer_lr, momentum=outer_momentum,
                                     nesterov=outer_momentum > 0)

    def weights(self, model: nn.Module) -> list[torch.Tensor]:
        return list(model.parameters())

    def after_step(self, model: nn.Module, step: int) -> None:
        super().after_step(model, step)
        if (step + 1) % self.H != 0:
            self.metrics.record_staleness((step + 1) % self.H)
            return
        weights = self.weights(model)
        with torch.no_grad():
            self._average_(weights)
            for a, w in zip(self.anchor, weights):
                a.grad = a - w  # pseudo-gradient: how far the (averaged) workers moved
            self.outer.step()
            for a, w in zip(self.anchor, weights):
                w.copy_(a)
        self.metrics.record_staleness(self.H)

    def evaluation_weights(self, model: nn.Module) -> list[torch.Tensor]:
        return [a.clone() for a in self.anchor]

    def state_dict(self) -> dict:
        return {"anchor": [a.detach().clone() for a in self.anchor],
                "outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for a, saved in zip(self.anchor, state["anchor"]):
                a.copy_(saved)
        self.outer.load_state_dict(state["outer"])


def make_strategy(mode: Mode, model: nn.Module, group: Any = None,
                  **diloco_args) -> StalenessStrategy:
    if mode.server:
        raise UsageError(f"mode {mode} runs on a parameter server "
                         "(spd_ext.staleness.parameter_server), not as a collective strategy")
    if mode.kind == "ssgd":
        return SynchronousSGD(mode, group)
    if mode.kind == "delayed":
        return DelayedAllReduce(mode, group)
    if mode.kind == "local_sgd":
        return LocalSGD(mode, group)
    return DiLoCo(mode, model, group=group, **diloco_args)
