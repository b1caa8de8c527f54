"""Tensor- and data-parallel process groups from one world (Megatron's parallel_state, small).

Ranks ``[k*T, (k+1)*T)`` form tensor-parallel group k; ranks with the same position in
their tensor-parallel group form a data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from spd_ext.errors import UsageError


@dataclass(frozen=True)
class ModelParallelGroups:
    """This rank's tensor-parallel and data-parallel groups, and the ranks in each."""

    tp_group: Any
    tp_ranks: tuple[int, ...]
    dp_group: Any
    dp_ranks: tuple[int, ...]


def check_tp_size(tp_size: int, world_size: int) -> None:
    if tp_size < 1 or world_size % tp_size != 0:
        raise UsageError(f"tensor-parallel size {tp_size} must be a positive divisor of the world "
                         f"size {world_size}; launch a multiple of {tp_size} ranks or choose one "
                         f"of {[d for d in range(1, world_size + 1) if world_size % d == 0]}")


def block_and_strided_groups(block: int) -> tuple[tuple[Any, tuple[int, ...]],
                                                  tuple[Any, tuple[int, ...]]]:
    """This rank's ``(group, ranks)`` among the contiguous blocks ``[k*block, (k+1)*block)``
    and among the strided sets ``{j, j+block, ...}`` (collective: every rank creates every
    group, in the same order)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine: dict[str, Any] = {}
    for k in range(world // block):
        ranks = tuple(range(k * block, (k + 1) * block))
        group = dist.new_group(list(ranks))
        if rank in ranks:
            mine["block"] = (group, ranks)
    for j in range(block):
        ranks = tuple(range(j, world, block))
        group = dist.new_group(list(ranks))
        if rank in ranks:
            mine["strided"] = (group, ranks)
    return mine["block"], mine["strided"]


def initialize_model_parallel(tp_size: int) -> ModelParallelGroups:
    """Create the groups (collective: every rank calls it with the same ``tp_size``)."""
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed initialized first")
    check_tp_size(tp_size, dist.get_world_size())
    (tp_group, tp_ranks), (dp_group, dp_ranks) = block_and_strided_groups(tp_size)
    return ModelParallelGroups(tp_group=tp_group, tp_ranks=tp_ranks, dp_group=dp_group,
                               dp_ranks=dp_ranks)
