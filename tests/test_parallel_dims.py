"""The parallel layout: every size rule in ParallelDims, one message each naming the
caller's keys, and the groups it builds."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from spd_ext.launch import spawn
from spd_ext.parallel_dims import LayoutNames, ParallelDims


def test_sizes_that_do_not_fit_are_refused_naming_the_callers_keys() -> None:
    train = LayoutNames(tp="parallel.tp", islands="parallel.islands", launch=" (--nproc)")
    with pytest.raises(ValueError, match=r"^parallel.tp 4 does not divide the world size 6; "
                       r"launch a multiple of 4 ranks \(--nproc\) or set parallel.tp to one "
                       r"of \[1, 2, 3, 6\]$"):
        ParallelDims(6, 4, names=train)
    with pytest.raises(ValueError, match=r"^tensor-parallel size x islands 4 does not divide "
                       "the world size 6"):
        ParallelDims(6, 2, 2)
    with pytest.raises(ValueError, match="islands must be a positive integer, got 0"):
        ParallelDims(4, 1, 0)
    with pytest.raises(ValueError, match="tensor-parallel size must be a positive integer"):
        ParallelDims(4, True)
    dims = ParallelDims(8, 2, 2)
    assert (dims.dp, dims.data_ranks) == (2, 4)


def _groups(rank: int, world: int, tp: int, islands: int) -> tuple:
    topo = ParallelDims(world, tp, islands).build()
    again = ParallelDims(world, tp, islands).build()  # cached: no second set of groups
    mpu = topo.mpu
    return (topo.tp_ranks, topo.dp_ranks, topo.cross_island_ranks, again is topo,
            None if mpu is None else (mpu.get_model_parallel_world_size(),
                                      mpu.get_data_parallel_world_size(),
                                      dist.get_world_size(topo.dp_group)))


def test_the_groups_of_tensor_parallelism_inside_islands() -> None:
    got = spawn(_groups, 8, 2, 2, timeout=120)
    # ranks: tensor-parallel position fastest, then data parallel, then island
    assert got[0][:4] == ((0, 1), (0, 2), (0, 4), True)
    assert got[3][:3] == ((2, 3), (1, 3), (3, 7))
    assert got[6][:3] == ((6, 7), (4, 6), (2, 6))
    assert all(g[4] == (2, 2, 2) for g in got)


def test_the_groups_of_tensor_parallelism_alone() -> None:
    got = spawn(_groups, 4, 2, 1, timeout=120)
    assert [g[:3] for g in got] == [((0, 1), (0, 2), ()), ((0, 1), (1, 3), ()),
                                    ((2, 3), (0, 2), ()), ((2, 3), (1, 3), ())]
