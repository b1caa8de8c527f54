"""Training loop, evaluation, checkpoints and logs for the CLI and examples."""

from spd_ext.train.logging import RunLog
from spd_ext.train.trainer import TrainConfig, Trainer, TrainResult, lr_at, make_optimizer

__all__ = ["RunLog", "TrainConfig", "TrainResult", "Trainer", "lr_at", "make_optimizer"]
