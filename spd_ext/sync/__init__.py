"""Staleness control: delayed all-reduce, local SGD / DiLoCo, parameter-server SSP / ASGD /
SyncPS, straggler injection and staleness metrics."""

from spd_ext.sync.collective import (
    DelayedAllReduce,
    DiLoCo,
    LocalSGD,
    SynchronousSGD,
    SyncStrategy,
    make_strategy,
)
from spd_ext.sync.metrics import WorkerMetrics
from spd_ext.sync.modes import MODES, Mode, parse_mode
from spd_ext.sync.parameter_server import (
    Groups,
    ParameterServer,
    PSConfig,
    ServerStopped,
    Worker,
    train_worker,
)
from spd_ext.sync.stragglers import Straggler, StragglerHooks

__all__ = [
    "MODES", "DelayedAllReduce", "DiLoCo", "Groups", "LocalSGD", "Mode", "PSConfig",
    "ParameterServer", "ServerStopped", "Straggler", "StragglerHooks", "SyncStrategy",
    "SynchronousSGD", "Worker",
    "WorkerMetrics", "make_strategy", "parse_mode", "train_worker",
]
