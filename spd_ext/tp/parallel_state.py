"""Megatron's verbs for the tensor- and data-parallel groups of one world, over
:class:`spd_ext.parallel_dims.ParallelDims` (which holds the rules and builds the groups).

Ranks ``[k*T, (k+1)*T)`` form tensor-parallel group k; ranks with the same position in
their tensor-parallel group form a data-parallel group.
"""

from __future__ import annotations

import torch.distributed as dist

from spd_ext.parallel_dims import ParallelDims, Topology


def check_tp_size(tp_size: int, world_size: int) -> None:
    """Refuse a tensor-parallel size that does not divide the world (no collective)."""
    ParallelDims(world_size, tp_size)


def initialize_model_parallel(tp_size: int) -> Topology:
    """This rank's groups: ``tp_group`` / ``tp_ranks``, ``dp_group`` / ``dp_ranks``
    (collective the first time: every rank calls it with the same ``tp_size``)."""
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed initialized first")
    return ParallelDims(dist.get_world_size(), tp_size).build()
