"""Collective staleness modes: synchronous, delayed all-reduce, local SGD, DiLoCo.

Each strategy plugs into the Trainer: ``after_backward`` (gradient exchange; may ask the
trainer to skip the optimizer), ``after_step`` (parameter averaging) and ``finish``
(waits for collectives still in flight, so every rank shuts down cleanly).
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import deque
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spd_ext.comm import all_reduce
from spd_ext.comm.buckets import copy_back, flatten
from spd_ext.dp.aggregator import local_gradients
from spd_ext.sync.metrics import WorkerMetrics
from spd_ext.sync.modes import Mode


class SyncStrategy:
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


class SynchronousSGD(SyncStrategy):
    """``ssgd``: average the gradients every step."""

    def after_backward(self, model: nn.Module, step: int, loss: float) -> dict | None:
        self._average_(local_gradients(model))
        self.metrics.record_staleness(0)
        return None


class DelayedAllReduce(SyncStrategy):
    """``delayed:k``: step t's averaged gradient is applied at step t+k.

    The all-reduce of step t runs on a worker thread while steps t+1..t+k compute, so
    communication overlaps k steps of compute. The first k steps apply nothing (the
    optimizer is skipped); staleness is exactly k.
    """

    def __init__(self, mode: Mode, group: Any = None) -> None:
        super().__init__(mode, group)
        self.k = mode.value
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                             thread_name_prefix="spd_ext-delay")
        self._in_flight: deque[tuple[int, torch.Tensor, concurrent.futures.Future]] = deque()

    def after_backward(self, model: nn.Module, step: int, loss: float) -> dict | None:
        grads = local_gradients(model)
        buffer = flatten(grads)
        future = self._worker.submit(all_reduce, buffer, "mean", None, self.group)
        self._in_flight.append((step, buffer, future))
        self.metrics.messages += 1
        if len(self._in_flight) <= self.k:
            return {"skip_optimizer": True}
        issued, buffer, future = self._in_flight.popleft()
        start = time.perf_counter()
        future.result()
        self.metrics.add_idle(time.perf_counter() - start)
        copy_back(buffer, grads)
        self.metrics.record_staleness(step - issued)
        return None

    def finish(self, model: nn.Module) -> None:
        while self._in_flight:  # every rank issued the same collectives: complete them all
            self._in_flight.popleft()[2].result()
        self._worker.shutdown()


class LocalSGD(SyncStrategy):
    """``local_sgd:H``: local steps, parameters averaged every H steps (PyTorch's
    PeriodicModelAverager does the averaging)."""

    def __init__(self, mode: Mode, group: Any = None) -> None:
        super().__init__(mode, group)
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

        # warmup_steps=H-1: the first average follows the H-th step, then every H steps.
        self.averager = PeriodicModelAverager(period=mode.value, warmup_steps=mode.value - 1,
                                              process_group=group)
        self._since_average = 0

    def after_step(self, model: nn.Module, step: int) -> None:
        super().after_step(model, step)
        a = self.averager
        averaging = a.step >= a.warmup_steps and (a.step - a.warmup_steps) % a.period == 0
        start = time.perf_counter()
        self.averager.average_parameters(model.parameters())
        if averaging:
            self.metrics.add_idle(time.perf_counter() - start)
            self.metrics.messages += 1
            self._since_average = 0
        else:
            self._since_average += 1
        self.metrics.record_staleness(self._since_average)

    def evaluation_weights(self, model: nn.Module) -> list[torch.Tensor]:
        weights = [p.detach().clone() for p in model.parameters()]
        flat = flatten(weights)
        all_reduce(flat, "mean", group=self.group)  # the average the next sync would make
        copy_back(flat, weights)
        return weights


class DiLoCo(SyncStrategy):
    """``diloco:H`` (arXiv 2311.08105): H inner optimizer steps (the trainer's optimizer,
    AdamW by default), then an outer Nesterov SGD step on the averaged pseudo-gradient
    anchor - mean_i(theta_i), and every worker restarts from the new anchor."""

    def __init__(self, mode: Mode, model: nn.Module, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, group: Any = None) -> None:
        super().__init__(mode, group)
        self.H = mode.value
        self.anchor = [p.detach().clone().requires_grad_(False) for p in model.parameters()]
        self.outer = torch.optim.SGD(self.anchor, lr=outer_lr, momentum=outer_momentum,
                                     nesterov=outer_momentum > 0)

    def after_step(self, model: nn.Module, step: int) -> None:
        super().after_step(model, step)
        if (step + 1) % self.H != 0:
            self.metrics.record_staleness((step + 1) % self.H)
            return
        params = list(model.parameters())
        with torch.no_grad():
            self._average_(params)
            for a, p in zip(self.anchor, params):
                a.grad = a - p  # pseudo-gradient: how far the (averaged) workers moved
            self.outer.step()
            for a, p in zip(self.anchor, params):
                p.copy_(a)
        self.metrics.record_staleness(self.H)

    def evaluation_weights(self, model: nn.Module) -> list[torch.Tensor]:
        return [a.clone() for a in self.anchor]


def make_strategy(mode: Mode, model: nn.Module, group: Any = None, **diloco_args) -> SyncStrategy:
    if mode.server:
        raise ValueError(f"mode {mode} runs on a parameter server (spd_ext.sync.parameter_server)"
                         ", not as a collective strategy")
    if mode.kind == "ssgd":
        return SynchronousSGD(mode, group)
    if mode.kind == "delayed":
        return DelayedAllReduce(mode, group)
    if mode.kind == "local_sgd":
        return LocalSGD(mode, group)
    return DiLoCo(mode, model, group=group, **diloco_args)
