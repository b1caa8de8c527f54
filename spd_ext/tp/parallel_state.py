"""Tensor- and data-parallel process groups from one world (Megatron's parallel_state, small).

Ranks ``[k*T, (k+1)*T)`` form tensor-parallel group k; ranks with the same position in
their tensor-parallel group form a data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroups:
    tp_size: int
    dp_size: int
    tp_rank: int
    dp_rank: int
    tp_group: Any
    dp_group: Any
    tp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]


def check_tp_size(tp_size: int, world_size: int) -> None:
    if tp_size < 1 or world_size % tp_size != 0:
        raise ValueError(f"tensor-parallel size {tp_size} must be a positive divisor of the world "
                         f"size {world_size}; launch a multiple of {tp_size} ranks or choose one "
                         f"of {[d for d in range(1, world_size + 1) if world_size % d == 0]}")


def initialize_model_parallel(tp_size: int) -> ParallelGroups:
    """Create the groups (collective: every rank calls it with the same ``tp_size``)."""
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed initialized first")
    world, rank = dist.get_world_size(), dist.get_rank()
    check_tp_size(tp_size, world)
    mine: dict[str, Any] = {}
    for k in range(world // tp_size):  # every rank must create every group
        ranks = tuple(range(k * tp_size, (k + 1) * tp_size))
        group = dist.new_group(list(ranks))
        if rank in ranks:
            mine["tp"] = (group, ranks)
    for j in range(tp_size):
        ranks = tuple(range(j, world, tp_size))
        group = dist.new_group(list(ranks))
        if rank in ranks:
            mine["dp"] = (group, ranks)
    (tp_group, tp_ranks), (dp_group, dp_ranks) = mine["tp"], mine["dp"]
    return ParallelGroups(tp_size=tp_size, dp_size=world // tp_size,
                          tp_rank=tp_ranks.index(rank), dp_rank=dp_ranks.index(rank),
                          tp_group=tp_group, dp_group=dp_group, tp_ranks=tp_ranks,
                          dp_ranks=dp_ranks)
