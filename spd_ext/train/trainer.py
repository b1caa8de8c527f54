"""The Trainer: a model and an optimizer (no DeepSpeed) on the training loop, for the
experiments and examples.

nanoGPT's step (AdamW, warm-up + cosine LR, gradient clipping, fixed evaluation batches)
with what experiments need: a JSONL log, atomic checkpoints with resume
(:class:`~spd_ext.train.checkpoints.FileCheckpointer`), sync counts per step for
tensor-parallel models, and a hook after backward where data-parallel strategies reduce
gradients. The loop itself is :class:`~spd_ext.train.loop.TrainingLoop`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from spd_ext.errors import UsageError
from spd_ext.hooks import TrainerHooks, check_hooks
from spd_ext.tp.sharding import ShardedModel
from spd_ext.train.checkpoints import FileCheckpointer, is_main_process
from spd_ext.train.loop import LoopSettings, StepResult, TrainingDiverged, TrainingLoop
from spd_ext.train.trainer_config import TrainConfig
from spd_ext.utils.run_log import RunLog

BatchFn = Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    val_loss: float
    seconds: float
    tokens_per_second: float
    history: list[dict] = field(default_factory=list)


def scheduled_lr(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
                 schedule: str = "cosine") -> float:
    """nanoGPT's schedule: linear warm-up, then cosine decay to ``min_lr`` at
    ``decay_steps``, ``min_lr`` after; ``schedule="constant"`` keeps ``lr`` after warm-up."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The Trainer's learning rate at ``step``: warm-up, then cosine decay over max_steps."""
    return scheduled_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)


class OptimizerSettings(Protocol):
    """What AdamW is built from (a TrainConfig, `spd-ext train`'s training section)."""

    lr: float
    weight_decay: float
    beta1: float
    beta2: float


def make_optimizer(model: nn.Module, cfg: OptimizerSettings) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices and embeddings, not on biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and not name.endswith("bias") else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


class Trainer:
    """Trains ``model`` (``model(x, y) -> (logits, loss)``) on batches from ``batches`` with
    the training loop (:class:`~spd_ext.train.loop.TrainingLoop`).

    ``batches(split, step)`` returns (inputs, targets); evaluation asks for
    ``batches("val", -1 - i)`` so that it can serve fixed batches.

    ``hooks`` (a data-parallel aggregator, a staleness strategy, ...): a
    :class:`~spd_ext.hooks.TrainerHooks`, called before each step, after backward (where
    gradients are exchanged), after the update, for the weights to evaluate, and at the
    end. A :class:`~spd_ext.tp.ShardedModel` (``ReducedSyncGPT``) is checkpointed in the
    dense layout, has its partial gradients summed after backward and its all-reduces
    logged. ``optimizer`` defaults to AdamW (make_optimizer).
    ``checkpoint_extra`` is saved with every checkpoint (model config, tokenizer, ...).
    """

    def __init__(self, model: nn.Module, batches: BatchFn, cfg: TrainConfig,
                 hooks: TrainerHooks | None = None, checkpoint_extra: dict | None = None,
                 run_name: str = "run", optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model, self.batches, self.cfg = model, batches, cfg
        self.hooks = check_hooks(hooks)
        self.sharded: ShardedModel | None = model if isinstance(model, ShardedModel) else None
        self.optimizer = optimizer or make_optimizer(model, cfg)
        self.step = 0
        self.log = RunLog(Path(cfg.out_dir) / "log.jsonl" if cfg.out_dir and is_main_process()
                          else None, run_name=run_name, config=asdict(cfg),
                          quiet=cfg.quiet or not is_main_process())
        self.checkpointer = None if not cfg.out_dir else FileCheckpointer(
            Path(cfg.out_dir) / "ckpt.pt", model, self.optimizer, cfg, checkpoint_extra,
            self.sharded)
        # Tensor-parallel models report their all-reduces (none happen at tp_size 1).
        self.counter = self.sharded.sync_counter if self.sharded is not None and \
            self.sharded.config.tp_size > 1 else None
        self.loop = TrainingLoop(
            LoopSettings(cfg.max_steps, cfg.log_interval, cfg.eval_interval,
                         cfg.checkpoint_interval),
            self.train_step, self.optimizer, lambda step: lr_at(step, cfg), self.evaluate,
            checkpointer=self.checkpointer, log=self.log)
        if cfg.resume:
            if self.checkpointer is None:
                raise UsageError("resume needs out_dir (where the checkpoint is)")
            self.step = self.loop.resume()

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> float:
        was_training = self.model.training
        self.model.eval()
        weights = self.hooks.evaluation_weights(self.model)
        params = list(self.model.parameters())
        saved = None
        if weights is not None:  # e.g. local SGD: evaluate the average, not this rank
            saved = [p.detach().clone() for p in params]
            for p, w in zip(params, weights):
                p.copy_(w)
        losses = []
        for i in range(self.cfg.eval_batches):
            x, y = self.batches(split, -1 - i)
            losses.append(self.model(x, y)[1].item())
        if saved is not None:
            for p, w in zip(params, saved):
                p.copy_(w)
        self.model.train(was_training)
        return sum(losses) / len(losses)

    def train_step(self, step: int) -> StepResult:
        """One step: forward, backward, the hooks' gradient exchange, clipping, update."""
        model = self.model
        self.hooks.before_step(step)
        x, y = self.batches("train", step)
        _, loss = model(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.sharded is not None:
            self.sharded.sync_partial_grads_()
        value = loss.item()  # the hooks weigh each rank by it
        metrics = dict(self.hooks.after_backward(model, step, value) or {})
        if not metrics.pop("skip_optimizer", False):
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
        self.hooks.after_step(model, step)
        syncs = self.counter.step() if self.counter is not None else None
        if not math.isfinite(value):
            raise TrainingDiverged(step, value)
        if syncs:
            metrics.update(syncs_fwd=syncs["forward"], syncs_bwd=syncs["backward"])
        self.step = step + 1
        return StepResult(loss.detach(), x.numel(), metrics)

    def train(self) -> TrainResult:
        self.model.train()
        result = self.loop.run(self.step)
        self.hooks.finish(self.model)
        self.loop.finish()
        self.log.close()
        return TrainResult(steps=self.step, train_loss=result.last_loss,
                           val_loss=result.val_loss, seconds=result.seconds,
                           tokens_per_second=result.tokens / max(result.seconds, 1e-9),
                           history=self.log.history)
