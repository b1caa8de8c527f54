"""The checkpointers of the training loop (:class:`~spd_ext.train.loop.Checkpointer`): the
only code that writes a run's checkpoints.

- :class:`FileCheckpointer` (the :class:`~spd_ext.train.Trainer`): one file, ``ckpt.pt``,
  with the dense weights, the optimizer, the step, the RNG and the caller's extra state,
  replaced atomically.
- :class:`EngineCheckpointer` (`spd-ext train`): DeepSpeed's files under
  ``CHECKPOINT_DIR/<tag>/``, each rank's RNG and step beside them; once every rank's files
  are on disk, the completion marker, and only then ``latest`` naming the tag.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from spd_ext.errors import MissingFileError, UsageError
from spd_ext.train.config import COMPLETE, LATEST, RunPlan
from spd_ext.utils.files import atomic_path, explained_write_errors, load_checkpoint, write_json

__all__ = ["EngineCheckpointer", "FileCheckpointer", "is_main_process", "rank_state_path"]


def is_main_process() -> bool:
    """Whether this process writes what one process writes (rank 0, or no group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


class FileCheckpointer:
    """``path`` (ckpt.pt) for ``model`` (a ShardedModel is saved dense) and ``optimizer``;
    ``config`` (the TrainConfig) and ``extra`` (model config, tokenizer, ...) go with every
    checkpoint. The main process writes; a distributed tensor-parallel model gathers its
    shards first (every rank calls :meth:`save`)."""

    def __init__(self, path: Path, model: Any, optimizer: Any, config: Any,
                 extra: dict | None = None, sharded: Any = None) -> None:
        self.path, self.model, self.optimizer = path, model, optimizer
        self.config, self.extra, self.sharded = config, extra or {}, sharded

    def state(self, step: int) -> dict:
        weights = (self.sharded.dense_state_dict() if self.sharded is not None
                   else self.model.state_dict())
        return {"model": weights, "optimizer": self.optimizer.state_dict(), "step": step,
                "train_config": asdict(self.config), "rng": torch.get_rng_state(),
                **self.extra}

    def save(self, step: int) -> str:
        state = self.state(step)  # collective for distributed tensor-parallel models
        if is_main_process():
            with atomic_path(self.path) as tmp:
                torch.save(state, tmp)
        return str(self.path)

    def load(self) -> tuple[int, dict]:
        if not self.path.is_file():
            raise MissingFileError(f"--resume: no checkpoint at {self.path}")
        state = load_checkpoint(self.path)
        missing = [k for k in ("model", "optimizer", "step", "rng") if k not in state]
        if missing:
            raise UsageError(f"{self.path} lacks {', '.join(missing)}: it was not written by "
                             "spd_ext's Trainer; resume from the run's own ckpt.pt")
        about: dict = {"path": str(self.path)}
        if self.sharded is not None:
            self.sharded.load_dense_state_dict(state["model"])
        else:
            self.model.load_state_dict(state["model"])
        if self.sharded is None or self.sharded.comm.emulated:
            self.optimizer.load_state_dict(state["optimizer"])
        else:  # rank 0's optimizer state holds only its own shards
            about["optimizer_state"] = ("not restored (distributed tensor parallel): AdamW "
                                        "moments restart from zero")
        torch.set_rng_state(state["rng"])
        return int(state["step"]), about


def rank_state_path(checkpoint_dir: Path, tag: str, rank: int) -> Path:
    """Where a rank's own state (its RNG and step) lies in checkpoint ``tag``."""
    return checkpoint_dir / tag / "train" / f"rank{rank:05d}.pt"


class EngineCheckpointer:
    """`spd-ext train`'s checkpoints of ``engine`` in ``plan.checkpoint_dir``; ``resume_tag``:
    the checkpoint :meth:`load` restores. A write that fails raises WriteError (saying so
    when the disk is full)."""

    def __init__(self, engine: Any, plan: RunPlan, tokenizer: Any,
                 mark: Callable[[str], None] = lambda phase: None,
                 resume_tag: str | None = None) -> None:
        self.engine, self.plan, self.tokenizer, self.mark = engine, plan, tokenizer, mark
        self.resume_tag = resume_tag

    def save(self, step: int) -> str:
        ckpt, tag, rank = self.plan.checkpoint_dir, f"global_step{step}", dist.get_rank()
        self.mark(f"saving checkpoint {tag}")
        with explained_write_errors(ckpt / tag, "checkpoint"):
            self.engine.save_checkpoint(str(ckpt), tag=tag, save_latest=False)
            state = {"step": step, "rng": torch.get_rng_state()}
            if torch.cuda.is_available():
                state["cuda_rng"] = torch.cuda.get_rng_state()
            with atomic_path(rank_state_path(ckpt, tag, rank)) as tmp:
                torch.save(state, tmp)
        self.mark(f"checkpoint {tag} written, waiting for the other ranks")
        dist.barrier()
        if rank == 0:
            with explained_write_errors(ckpt / tag, "checkpoint"):
                write_json(ckpt / tag / "train" / COMPLETE,
                           {"step": step, "layout": self.plan.checkpoint_layout(self.tokenizer),
                            "decay_steps": self.plan.decay_steps, "time": time.time()})
                with atomic_path(ckpt / LATEST) as tmp:  # after the marker, never before
                    tmp.write_text(tag)
        dist.barrier()
        return str(ckpt / tag)

    def load(self) -> tuple[int, dict]:
        tag, ckpt = self.resume_tag, self.plan.checkpoint_dir
        if tag is None:
            raise UsageError("--resume: no checkpoint was chosen to resume from")
        self.mark(f"loading checkpoint {tag}")
        out = self.engine.load_checkpoint(str(ckpt), tag=tag)
        if out is None or out[0] is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {tag} in {ckpt}")
        state = load_checkpoint(rank_state_path(ckpt, tag, dist.get_rank()),
                                "spd-ext train rank state")
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
        return int(state["step"]), {"tag": tag}
