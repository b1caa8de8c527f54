"""Staleness control: delayed all-reduce, local SGD / DiLoCo, parameter-server SSP / ASGD /
SyncPS, straggler injection and staleness metrics."""

from spd_ext.staleness.collective import (
    DelayedAllReduce,
    DiLoCo,
    LocalSGD,
    StalenessStrategy,
    SynchronousSGD,
    make_strategy,
)
from spd_ext.staleness.faults import WorkerKill
from spd_ext.staleness.metrics import WorkerMetrics
from spd_ext.staleness.modes import MODES, Mode, parse_mode
from spd_ext.staleness.parameter_server import (
    ParameterServer,
    PSConfig,
    PSProcessGroups,
    PSSessions,
    ServerStopped,
    Worker,
    train_worker,
)
from spd_ext.staleness.stragglers import Straggler, StragglerHooks

__all__ = [
    "MODES", "DelayedAllReduce", "DiLoCo", "LocalSGD", "Mode", "PSConfig", "PSProcessGroups",
    "PSSessions", "ParameterServer", "ServerStopped", "Straggler", "StragglerHooks",
    "StalenessStrategy", "SynchronousSGD", "Worker",
    "WorkerKill", "WorkerMetrics", "make_strategy", "parse_mode", "train_worker",
]
