"""What the training loop is told (:class:`TrainConfig`), declared as options.

Torch-free: the experiments' configurations hold one, the command line derives flags from it
and the run configuration's ``training`` section takes the options it shares with it from
here (one default each).
"""

from __future__ import annotations

from dataclasses import dataclass

from spd_ext.errors import UsageError
from spd_ext.utils.options import Opt, check_fields, option, options_of


@dataclass
class TrainConfig:
    max_steps: int = option(500, "optimizer steps to run", low=1, flag="--steps")
    batch_size: int = option(32, "sequences per step (per rank where ranks run)", low=1)
    lr: float = option(1e-3, "peak learning rate", low=0.0)
    min_lr: float = option(1e-4, "learning rate at the end of the decay", low=0.0)
    warmup_steps: int = option(100, "linear warm-up steps", low=0)
    weight_decay: float = option(0.1, "AdamW weight decay (matrices and embeddings)", low=0.0)
    beta1: float = option(0.9, "AdamW beta1", low=0.0, high=1.0, high_open=True)
    beta2: float = option(0.99, "AdamW beta2", low=0.0, high=1.0, high_open=True)
    grad_clip: float = option(1.0, "gradient-norm clipping (0: off)", low=0.0)
    eval_interval: int = option(250, "steps between validation passes (0: at the end only)",
                                low=0)
    eval_batches: int = option(20, "validation batches per pass", low=1)
    log_interval: int = option(10, "steps between progress lines and log records (the loss "
                               "leaves the device only then)", low=1)
    checkpoint_interval: int = option(0, "steps between checkpoints (0: at the end only)",
                                      low=0)
    seed: int = option(1337, "initialization, data order and dropout")
    out_dir: str | None = option(None, "log, checkpoints (default: none written)")
    resume: bool = option(False, "continue from the last checkpoint in out_dir")
    quiet: bool = option(False, "no progress lines")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.min_lr > self.lr:
            raise UsageError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr} lr={self.lr}")


def shared_options(*names: str) -> dict[str, Opt]:
    """The declarations of ``names`` (for a configuration that shares them)."""
    declared = options_of(TrainConfig)
    return {name: declared[name] for name in names}
