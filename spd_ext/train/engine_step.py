"""`spd-ext train`'s parts of the training loop: a step and an evaluation through a
DeepSpeed engine (spd_ext.deepspeed), and the loss as the mean over the ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from spd_ext.train.loop import StepResult

__all__ = ["EngineEvaluation", "EngineStep", "mean_over_ranks"]

#: what the integration reports after a step, and the names the log gives them
_REPORTED = (("syncs_forward", "syncs_fwd"), ("syncs_backward", "syncs_bwd"),
             ("grad_norm", "grad_norm"))


class EngineStep:
    """One optimizer step of ``engine``: ``grad_accum`` micro-batches of this data-parallel
    replica's shard (``sampler``), the loss summed on the device. Where ``checks(done)``
    (a log or checkpoint step), the integration's NaN check runs: a NaN since its last
    check stops the run there, before a checkpoint could keep it."""

    def __init__(self, engine: Any, sampler: Any, grad_accum: int, tokens_per_step: int,
                 checks: Callable[[int], bool]) -> None:
        self.engine, self.sampler, self.grad_accum = engine, sampler, grad_accum
        self.tokens_per_step, self.checks = tokens_per_step, checks

    def __call__(self, step: int) -> StepResult:
        engine, gas = self.engine, self.grad_accum
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        for micro in range(gas):
            x, y = self.sampler("train", step * gas + micro)
            _, loss = engine(x.to(engine.device), y.to(engine.device))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().double()
        if self.checks(step + 1):
            engine.spd_ext.check()  # raises WeightError on every rank together
        last = engine.spd_ext.last
        metrics = {name: last[key] for key, name in _REPORTED if key in last}
        if last.get("weights") is not None:
            metrics["weights"] = list(last["weights"])
        return StepResult(loss_sum / gas, self.tokens_per_step, metrics)


class EngineEvaluation:
    """Mean clean validation loss over ``eval_batches`` fixed batches, split over the
    data-parallel replicas (every rank of a tensor-parallel group runs the same ones)."""

    def __init__(self, engine: Any, sampler: Any, eval_batches: int, data_rank: int,
                 data_world: int, tp: int, zero_stage: int, counter: Any = None) -> None:
        self.engine, self.sampler, self.eval_batches = engine, sampler, eval_batches
        self.data_rank, self.data_world, self.tp = data_rank, data_world, tp
        self.zero_stage, self.counter = zero_stage, counter

    def __call__(self) -> float:
        engine, n = self.engine, self.eval_batches
        engine.eval()
        total = 0.0
        # ZeRO-3 gathers the parameters inside every forward (a collective): each rank runs
        # as many forwards, the ones past eval_batches uncounted
        rounds = -(-n // self.data_world)
        last = rounds * self.data_world if self.zero_stage == 3 else n
        with torch.no_grad():
            for i in range(self.data_rank, last, self.data_world):
                x, y = self.sampler("val", -1 - (i % n))
                loss = engine(x.to(engine.device), y.to(engine.device))[1]
                if i < n:
                    total += float(loss.float())
        engine.train()
        if self.counter is not None:
            self.counter.reset()  # the evaluation's syncs are not a training step's
        summed = torch.tensor([total], dtype=torch.float64, device=engine.device)
        dist.all_reduce(summed)  # on the backend's device (NCCL reduces GPU tensors only)
        return summed.item() / (self.tp * n)


def mean_over_ranks(loss: torch.Tensor) -> float:
    """A step's loss (this rank's, on its device) as the mean over every rank."""
    reduced = loss.detach().reshape(1).clone()  # the caller keeps the tensor itself
    dist.all_reduce(reduced)  # on the backend's device (NCCL reduces GPU tensors only)
    return reduced.item() / dist.get_world_size()
