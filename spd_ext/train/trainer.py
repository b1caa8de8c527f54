"""The training loop behind the CLI experiments and examples.

nanoGPT's loop (AdamW, warm-up + cosine LR, gradient clipping, fixed evaluation batches)
with what experiments need: a JSONL log, progress lines, atomic checkpoints with resume,
sync counts per step for tensor-parallel models, and a hook after backward where data-
parallel strategies reduce gradients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from spd_ext.errors import MissingFileError, UsageError
from spd_ext.hooks import TrainerHooks, check_hooks
from spd_ext.tp.sharding import ShardedModel
from spd_ext.utils.files import atomic_path, load_checkpoint
from spd_ext.utils.run_log import RunLog

BatchFn = Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainConfig:
    max_steps: int = 500
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 0  # 0: only at the end (when out_dir is set)
    seed: int = 1337
    out_dir: str | None = None
    resume: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "eval_batches", "log_interval"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.eval_interval < 0 or self.checkpoint_interval < 0:
            raise UsageError("warmup_steps, eval_interval and checkpoint_interval must be >= 0")
        if not 0 <= self.min_lr <= self.lr:
            raise UsageError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr} lr={self.lr}")


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


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class Trainer:
    """Trains ``model`` (``model(x, y) -> (logits, loss)``) on batches from ``batches``.

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
        self.checkpoint_extra = checkpoint_extra or {}
        self.optimizer = optimizer or make_optimizer(model, cfg)
        self.step = 0
        self.log = RunLog(Path(cfg.out_dir) / "log.jsonl" if cfg.out_dir and is_main_process()
                          else None, run_name=run_name, config=asdict(cfg),
                          quiet=cfg.quiet or not is_main_process())
        if cfg.resume:
            self._resume()

    # -- checkpoints --------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        if not self.cfg.out_dir:
            raise UsageError("checkpoints need out_dir")
        return Path(self.cfg.out_dir) / "ckpt.pt"

    def state(self) -> dict:
        model_state = (self.sharded.dense_state_dict() if self.sharded is not None
                       else self.model.state_dict())
        return {"model": model_state, "optimizer": self.optimizer.state_dict(),
                "step": self.step, "train_config": asdict(self.cfg),
                "rng": torch.get_rng_state(), **self.checkpoint_extra}

    def save_checkpoint(self) -> Path:
        """Atomic: written to a temporary file, then renamed over the old checkpoint."""
        state = self.state()  # collective for distributed tensor-parallel models
        path = self.checkpoint_path()
        if is_main_process():
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
        return path

    def _resume(self) -> None:
        path = self.checkpoint_path()
        if not path.is_file():
            raise MissingFileError(f"--resume: no checkpoint at {path}")
        state = load_checkpoint(path)
        missing = [k for k in ("model", "optimizer", "step", "rng") if k not in state]
        if missing:
            raise UsageError(f"{path} lacks {', '.join(missing)}: it was not written by "
                             "spd_ext's Trainer; resume from the run's own ckpt.pt")
        if self.sharded is not None:
            self.sharded.load_dense_state_dict(state["model"])
        else:
            self.model.load_state_dict(state["model"])
        if self.sharded is None or self.sharded.comm.emulated:
            self.optimizer.load_state_dict(state["optimizer"])
        else:  # rank 0's optimizer state holds only its own shards
            self.log.event("resume-without-optimizer-state", reason="distributed tensor "
                           "parallel: AdamW moments restart from zero")
        self.step = state["step"]
        torch.set_rng_state(state["rng"])
        dropped = self.log.drop_after(self.step)  # the crashed run's steps past the checkpoint
        self.log.event("resume", step=self.step, path=str(path), dropped_records=dropped)

    # -- loop ---------------------------------------------------------------------
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

    def train(self) -> TrainResult:
        cfg, model = self.cfg, self.model
        model.train()
        # Tensor-parallel models report their all-reduces (none happen at tp_size 1).
        counter = None
        if self.sharded is not None and self.sharded.config.tp_size > 1:
            counter = self.sharded.sync_counter
        start, tokens, last_loss = time.perf_counter(), 0, float("nan")
        val_loss = float("nan")
        while self.step < cfg.max_steps:
            lr = lr_at(self.step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.hooks.before_step(self.step)
            x, y = self.batches("train", self.step)
            _, loss = model(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.sharded is not None:
                self.sharded.sync_partial_grads_()
            extra = dict(self.hooks.after_backward(model, self.step, loss.item()) or {})
            if not extra.pop("skip_optimizer", False):
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                self.optimizer.step()
            self.hooks.after_step(model, self.step)
            syncs = counter.step() if counter is not None else None
            last_loss = loss.item()
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"training loss became {last_loss} at step {self.step}; "
                                         "lower the learning rate")
            tokens += x.numel()
            self.step += 1
            if syncs:
                extra.update(syncs_fwd=syncs["forward"], syncs_bwd=syncs["backward"])
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                self.log.metrics(step=self.step, loss=last_loss, lr=lr,
                                 elapsed=time.perf_counter() - start, **extra)
            if cfg.eval_interval and self.step % cfg.eval_interval == 0 \
                    and self.step < cfg.max_steps:
                val_loss = self.evaluate()
                self.log.metrics(step=self.step, val_loss=val_loss,
                                 elapsed=time.perf_counter() - start)
            if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0 \
                    and cfg.out_dir:
                self.save_checkpoint()
        self.hooks.finish(model)
        seconds = time.perf_counter() - start
        val_loss = self.evaluate()
        self.log.metrics(step=self.step, val_loss=val_loss, elapsed=seconds, final=True)
        if cfg.out_dir:
            self.save_checkpoint()
        self.log.close()
        return TrainResult(steps=self.step, train_loss=last_loss, val_loss=val_loss,
                           seconds=seconds, tokens_per_second=tokens / max(seconds, 1e-9),
                           history=self.log.history)
