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
    check stops the run there, before a checkpoint could keep it. ``pipeline``: a
    PipelineEngine, which takes the step's micro-batches in one ``train_batch`` (its loss:
    the mean over the replicas, on every stage)."""

    def __init__(self, engine: Any, sampler: Any, grad_accum: int, tokens_per_step: int,
                 checks: Callable[[int], bool], pipeline: bool = False) -> None:
        self.engine, self.sampler, self.grad_accum = engine, sampler, grad_accum
        self.tokens_per_step, self.checks = tokens_per_step, checks
        self.pipeline = pipeline

    def _micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        device, gas = self.engine.device, self.grad_accum
        return [tuple(t.to(device) for t in self.sampler("train", step * gas + micro))
                for micro in range(gas)]

    def __call__(self, step: int) -> StepResult:
        engine, gas = self.engine, self.grad_accum
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        if self.pipeline:
            loss_sum += engine.train_batch(iter(self._micro_batches(step))).double() * gas
        else:
            for x, y in self._micro_batches(step):
                _, loss = engine(x, y)
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach().double()
        if self.checks(step + 1):
            engine.spd_ext.check()  # raises WeightError on every rank together
        last = engine.spd_ext.last
        metrics = {name: last[key] for key, name in _REPORTED if key in last}
        if last.get("weights") is not None:
            metrics["weights"] = list(last["weights"])
        if engine.spd_ext.islands_present is not None:  # fault-tolerant islands
            metrics["islands"] = engine.spd_ext.islands_present
        return StepResult(loss_sum / gas, self.tokens_per_step, metrics)


class EngineEvaluation:
    """Mean clean validation loss over ``eval_batches`` fixed batches, split over the
    data-parallel replicas (every rank of a tensor-parallel group runs the same ones).
    ``pipeline``: a PipelineEngine, whose last stage computes the losses."""

    def __init__(self, engine: Any, sampler: Any, eval_batches: int, data_rank: int,
                 data_world: int, tp: int, zero_stage: int, counter: Any = None,
                 pipeline: bool = False) -> None:
        self.engine, self.sampler, self.eval_batches = engine, sampler, eval_batches
        self.data_rank, self.data_world, self.tp = data_rank, data_world, tp
        self.zero_stage, self.counter = zero_stage, counter
        self.pipeline = pipeline

    def _pipeline_total(self) -> float:
        """This rank's share of the summed losses: the replica's batches through its
        stages (every replica the same number, the ones past eval_batches uncounted, as
        DeepSpeed's evaluation waits for every replica); the last stage's tensor-parallel
        ranks hold the losses."""
        engine, n, world = self.engine, self.eval_batches, self.data_world
        mine = list(range(self.data_rank, -(-n // world) * world, world))
        batches = [tuple(t.to(engine.device) for t in self.sampler("val", -1 - (i % n)))
                   for i in mine]
        losses = engine.eval_batch(iter(batches), reduce_output=None, bcast_loss=False,
                                   num_micro_batches=len(batches))
        engine.train()
        if not engine.is_last_stage():
            return 0.0
        return sum(float(loss.float()) for i, loss in zip(mine, losses) if i < n)

    def __call__(self) -> float:
        engine, n = self.engine, self.eval_batches
        if self.pipeline:
            return self._reduce(self._pipeline_total())
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
        return self._reduce(total)

    def _reduce(self, total: float) -> float:
        if self.counter is not None:
            self.counter.reset()  # the evaluation's syncs are not a training step's
        summed = torch.tensor([total], dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(summed)  # on the backend's device (NCCL reduces GPU tensors only)
        return summed.item() / (self.tp * self.eval_batches)


def mean_over_ranks(loss: torch.Tensor) -> float:
    """A step's loss (this rank's, on its device) as the mean over every rank."""
    reduced = loss.detach().reshape(1).clone()  # the caller keeps the tensor itself
    dist.all_reduce(reduced)  # on the backend's device (NCCL reduces GPU tensors only)
    return reduced.item() / dist.get_world_size()
