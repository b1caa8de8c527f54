"""The parallel layout of a job, every size rule in one place (torchtitan's ``ParallelDims``).

``world = islands x pp x dp x tp``. Ranks are numbered tensor-parallel position fastest,
then data-parallel position, then pipeline stage, then island:

* ranks ``[k*tp, (k+1)*tp)`` form tensor-parallel group k (one model replica, or one
  stage of one);
* inside an island (and a stage), the ranks at the same tensor-parallel position form a
  data-parallel group (DeepSpeed's: its ZeRO partitions and gradient reduction);
* islands (DiLoCo) are ``world / islands`` contiguous ranks each; the ranks at the same
  position of their islands (same shard, same ZeRO partition) average across islands;
* inside an island, pipeline stages are contiguous blocks of ``dp x tp`` ranks, DeepSpeed's
  ``PipeModelDataParallelTopology`` (whose grid is then DeepSpeed's ``mpu``); a model
  replica is one data-parallel index's ranks of every stage.

:class:`ParallelDims` checks the sizes (each rule once, one message naming the caller's
own keys) and builds the groups and DeepSpeed's ``mpu`` (:class:`ModelParallelUnit`) as a
:class:`Topology`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from spd_ext.errors import UsageError

__all__ = ["LayoutNames", "ModelParallelUnit", "ParallelDims", "Topology"]


@dataclass(frozen=True)
class LayoutNames:
    """What the caller's users call each size (a config key, a flag), for the messages."""

    tp: str = "tensor-parallel size"
    islands: str = "islands"
    pp: str = "pipeline stages"
    launch: str = ""  # how to launch more ranks, e.g. " (--nproc)"


@dataclass(frozen=True)
class ParallelDims:
    """``world`` ranks as ``islands`` x pipeline stages ``pp`` x data parallel x tensor
    parallel ``tp``; refuses sizes that do not fit (a :class:`UsageError` naming the keys
    of ``names``)."""

    world: int
    tp: int = 1
    islands: int = 1
    names: LayoutNames = field(default=LayoutNames(), compare=False, repr=False)
    pp: int = 1

    def __post_init__(self) -> None:
        n = self.names
        for what, size in (("the world size", self.world), (n.tp, self.tp),
                           (n.islands, self.islands), (n.pp, self.pp)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise UsageError(f"{what} must be a positive integer, got {size!r}")
        for what, size in ((n.tp, self.tp), (n.islands, self.islands), (n.pp, self.pp),
                           (f"{n.tp} x {n.islands}", self.tp * self.islands),
                           (f"{n.pp} x {n.tp}", self.pp * self.tp),
                           (f"{n.pp} x {n.tp} x {n.islands}",
                            self.pp * self.tp * self.islands)):
            if self.world % size:
                divisors = [d for d in range(1, self.world + 1) if self.world % d == 0]
                raise UsageError(f"{what} {size} does not divide the world size {self.world}; "
                                 f"launch a multiple of {size} ranks{n.launch} or set {what} "
                                 f"to one of {divisors}")

    @property
    def dp(self) -> int:
        """Data-parallel ranks of one island (DeepSpeed's data-parallel group)."""
        return self.world // (self.tp * self.islands * self.pp)

    @property
    def data_ranks(self) -> int:
        """Model replicas that read data of their own, in every island."""
        return self.world // (self.tp * self.pp)

    def data_rank(self, rank: int) -> int:
        """Which model replica's data ``rank`` reads (its tensor-parallel group's, the same
        on every pipeline stage; the islands' replicas one after the other)."""
        island, inside = divmod(rank, self.world // self.islands)
        return island * self.dp + (inside % (self.dp * self.tp)) // self.tp

    def build(self) -> Topology:
        """This rank's groups (collective the first time: every rank creates every group,
        in the same order; cached for the life of the default group, so every engine of a
        process shares them)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("building process groups needs torch.distributed initialized "
                               "first (deepspeed.init_distributed() or init_process_group)")
        if dist.get_world_size() != self.world:
            raise UsageError(f"this layout is for {self.world} ranks but torch.distributed "
                             f"has {dist.get_world_size()}")
        key = (id(dist.group.WORLD), self.tp, self.islands, self.pp)
        if key not in _BUILT:
            _BUILT[key] = self._build()
        return _BUILT[key]

    def _build(self) -> Topology:
        import torch.distributed as dist

        if self.tp == 1 and self.islands == 1 and self.pp == 1:
            return Topology(1, 1, None, dp_ranks=tuple(range(self.world)))
        # blocks of dp x tp ranks: one per island, or per stage of each island's pipeline
        blocks = self.islands * self.pp
        rank, size = dist.get_rank(), self.world // blocks
        island_size = self.world // self.islands
        tp_group, tp_ranks = _mine(rank, [range(k, k + self.tp)
                                          for k in range(0, self.world, self.tp)])
        dp_group, dp_ranks = _mine(rank, [range(i * size + j, (i + 1) * size, self.tp)
                                          for i in range(blocks) for j in range(self.tp)])
        cross: tuple[Any, tuple[int, ...]] = (None, ())
        if self.islands > 1:  # the same position in every island
            cross = _mine(rank, [range(j, self.world, island_size)
                                 for j in range(island_size)])
        replica: tuple[Any, tuple[int, ...]] = (None, ())
        if self.pp > 1:  # a model replica: every stage's ranks of one data-parallel index
            replica = _mine(rank, [[i * island_size + s * size + d * self.tp + m
                                    for s in range(self.pp) for m in range(self.tp)]
                                   for i in range(self.islands) for d in range(self.dp)])
        tensor_parallel = self.tp > 1
        return Topology(self.tp, self.islands,
                        # a pipeline's mpu is DeepSpeed's grid (PipelineModule.mpu())
                        ModelParallelUnit(tp_group, tp_ranks, dp_group, dp_ranks)
                        if self.pp == 1 else None,
                        tp_group=tp_group if tensor_parallel else None,
                        tp_ranks=tp_ranks if tensor_parallel else (),
                        dp_group=dp_group, dp_ranks=dp_ranks,
                        cross_island_group=cross[0], cross_island_ranks=cross[1], pp=self.pp,
                        replica_group=replica[0], replica_ranks=replica[1])


_BUILT: dict[tuple, Topology] = {}


def _mine(rank: int, partition: Sequence[Sequence[int]]) -> tuple[Any, tuple[int, ...]]:
    """Create a group for every set of ``partition`` (every rank, the same order); this
    rank's ``(group, ranks)``."""
    import torch.distributed as dist

    found: tuple[Any, tuple[int, ...]] | None = None
    for ranks in partition:
        group = dist.new_group(list(ranks))
        if rank in ranks:
            found = (group, tuple(ranks))
    assert found is not None, "the partition misses this rank"
    return found


class ModelParallelUnit:
    """DeepSpeed's ``mpu`` (Megatron's parallel-state interface) over a model-parallel and a
    data-parallel group. DeepSpeed asks it for its data-parallel group (broadcasts at
    start, batch-size arithmetic, gradient reduction, ZeRO partitions) and for the
    model-parallel group (gradient norms: sharded parameters count on every rank,
    replicated ones on model-parallel rank 0 only)."""

    def __init__(self, mp_group: Any, mp_ranks: tuple[int, ...], dp_group: Any,
                 dp_ranks: tuple[int, ...]) -> None:
        import torch.distributed as dist

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
    """This rank's groups of a :class:`ParallelDims` (and the ``mpu`` DeepSpeed reads)."""

    tp_size: int
    islands: int
    mpu: ModelParallelUnit | None
    tp_group: Any = None  # this rank's tensor-parallel group (tp_size > 1)
    tp_ranks: tuple[int, ...] = ()
    dp_group: Any = None  # what DeepSpeed reduces over (None: the world)
    dp_ranks: tuple[int, ...] = ()
    cross_island_group: Any = None  # same ZeRO partition on every island (islands > 1)
    cross_island_ranks: tuple[int, ...] = ()
    pp: int = 1  # pipeline stages
    replica_group: Any = None  # pp > 1: every rank of this rank's model replica
    replica_ranks: tuple[int, ...] = ()

    @property
    def island(self) -> int:
        import torch.distributed as dist

        return dist.get_rank() // (dist.get_world_size() // self.islands)
