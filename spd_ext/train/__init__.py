"""Training loop, evaluation, checkpoints and logs for the CLI and examples; `spd-ext train`'s
run configuration (spd_ext.train.config) and rank program (spd_ext.train.run)."""

from spd_ext.hooks import TrainerHooks
from spd_ext.train.config import (
    ConfigError,
    RunConfig,
    RunPlan,
    check_environment,
    load_config,
    plan_run,
)
from spd_ext.train.trainer import TrainConfig, Trainer, TrainResult, lr_at, make_optimizer
from spd_ext.utils.run_log import RunLog

__all__ = ["ConfigError", "RunConfig", "RunLog", "RunPlan", "TrainConfig", "TrainResult",
           "Trainer", "TrainerHooks", "check_environment", "load_config", "lr_at",
           "make_optimizer", "plan_run"]
