"""Which ranks reduce with which: tensor-parallel x data-parallel groups, or DiLoCo islands,
and the ``mpu`` object through which DeepSpeed learns them.

DeepSpeed asks an ``mpu`` (Megatron's parallel-state interface) for its data-parallel
group (broadcasts at start, batch-size arithmetic, gradient reduction, ZeRO partitions)
and for the model-parallel group (gradient norms: sharded parameters count on every
rank, replicated ones on model-parallel rank 0 only).

* tensor parallelism T: ranks ``[k*T, (k+1)*T)`` form tensor-parallel group k (one model
  replica), ranks at the same position of their group form a data-parallel group.
* islands K (DiLoCo): ranks ``[k*S, (k+1)*S)``, S = world / K, form island k, DeepSpeed's
  data-parallel group (ZeRO-1, 2 or 3 inside it); ranks at the same position of their
  island hold the same ZeRO partition and average it across islands every H steps.
* both: island k splits as above into tensor-parallel groups of T contiguous ranks; its
  data-parallel group is the ranks at the same tensor-parallel position in the island;
  ranks at the same position of their island (same shard, same ZeRO partition) average
  across islands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from spd_ext.errors import UsageError
from spd_ext.tp.parallel_state import block_and_strided_groups, initialize_model_parallel


class ModelParallelUnit:
    """DeepSpeed's ``mpu`` interface over a model-parallel and a data-parallel group."""

    def __init__(self, mp_group: Any, mp_ranks: tuple[int, ...], dp_group: Any,
                 dp_ranks: tuple[int, ...]) -> None:
        rank = dist.get_rank()
        self._mp = (mp_group, mp_ranks, mp_ranks.index(rank))
        self._dp = (dp_group, dp_ranks, dp_ranks.index(rank))

    # model (tensor) parallel: Megatron's old and new names, both read by DeepSpeed
    def get_model_parallel_group(self) -> Any:
        return self._mp[0]

    def get_model_parallel_world_size(self) -> int:
        return len(self._mp[1])

    def get_model_parallel_rank(self) -> int:
        return self._mp[2]

    def get_model_parallel_src_rank(self) -> int:
        return self._mp[1][0]

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_src_rank = get_model_parallel_src_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    # data parallel
    def get_data_parallel_group(self) -> Any:
        return self._dp[0]

    def get_data_parallel_world_size(self) -> int:
        return len(self._dp[1])

    def get_data_parallel_rank(self) -> int:
        return self._dp[2]

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._dp[1])


@dataclass(frozen=True)
class Topology:
    tp_size: int
    islands: int
    mpu: ModelParallelUnit | None
    tp_group: Any = None  # this rank's tensor-parallel group (tp_size > 1)
    tp_ranks: tuple[int, ...] = ()
    dp_group: Any = None  # what DeepSpeed reduces over (None: the world)
    dp_ranks: tuple[int, ...] = ()
    cross_island_group: Any = None  # same ZeRO partition on every island (islands > 1)
    cross_island_ranks: tuple[int, ...] = ()

    @property
    def island(self) -> int:
        return dist.get_rank() // (dist.get_world_size() // self.islands)


_CACHE: dict[tuple, Topology] = {}


def build_topology(tp_size: int = 1, islands: int = 1) -> Topology:
    """The groups for ``tp_size`` and ``islands`` (collective the first time; cached for
    the life of the process group, so every engine of a process shares them)."""
    if not dist.is_initialized():
        raise RuntimeError("spd_ext.deepspeed needs torch.distributed initialized; call "
                           "deepspeed.init_distributed() first (initialize() does)")
    key = (id(dist.group.WORLD), tp_size, islands)
    if key in _CACHE:
        return _CACHE[key]
    world = dist.get_world_size()
    if islands > 1:
        topo = _islands(tp_size, islands)
    elif tp_size > 1:
        groups = initialize_model_parallel(tp_size)
        topo = Topology(tp_size, 1, ModelParallelUnit(groups.tp_group, groups.tp_ranks,
                                                       groups.dp_group, groups.dp_ranks),
                        tp_group=groups.tp_group, tp_ranks=groups.tp_ranks,
                        dp_group=groups.dp_group, dp_ranks=groups.dp_ranks)
    else:
        topo = Topology(1, 1, None, dp_ranks=tuple(range(world)))
    _CACHE[key] = topo
    return topo


def _islands(tp_size: int, islands: int) -> Topology:
    """Islands, each of tensor x data parallelism (``tp_size`` 1: data parallelism alone,
    the model-parallel group of one rank). Collective: every rank creates every group, in
    the same order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp_size * islands) != 0:
        raise UsageError(f"{islands} islands of tensor-parallel size {tp_size} do not divide "
                         f"the world size {world}")
    size = world // islands  # ranks per island
    (tp_group, tp_ranks), _ = block_and_strided_groups(tp_size)
    _, (cross_group, cross_ranks) = block_and_strided_groups(size)
    dp: tuple[Any, tuple[int, ...]] | None = None
    for island in range(islands):
        for position in range(tp_size):
            ranks = tuple(range(island * size + position, (island + 1) * size, tp_size))
            group = dist.new_group(list(ranks))
            if rank in ranks:
                dp = (group, ranks)
    assert dp is not None
    tensor_parallel = tp_size > 1
    return Topology(tp_size, islands, ModelParallelUnit(tp_group, tp_ranks, dp[0], dp[1]),
                    tp_group=tp_group if tensor_parallel else None,
                    tp_ranks=tp_ranks if tensor_parallel else (),
                    dp_group=dp[0], dp_ranks=dp[1],
                    cross_island_group=cross_group, cross_island_ranks=cross_ranks)
