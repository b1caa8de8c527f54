"""DeepSpeed's communication set-up for the benchmarks that use it (`bench allreduce`'s
deepspeed column, `bench deepspeed`), leaving nothing behind in /dev/shm.

DeepSpeed's CPU communication op creates a 66 MiB segment per rank in
``deepspeed.init_distributed``, maps every peer's and never unlinks the names, so each run
of a benchmark left ``nproc`` of them.
"""

from __future__ import annotations

import contextlib
import os


def init_deepspeed_comm() -> None:
    """``deepspeed.init_distributed`` over the rank's process group, then the segments'
    names released at once (collective; ImportError without DeepSpeed)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from spd_ext.deepspeed.ops import load_deepspeed_comm_op

    load_deepspeed_comm_op()  # under spd_ext's build lock: never a silent hang
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    release_deepspeed_segments()


def release_deepspeed_segments() -> None:
    """Unlink the names of DeepSpeed's segments right after ``init_distributed``
    (collective), before anything can fail or return early: no exit path of the benchmark
    leaves them. When a peer fails before the barrier (or the job is interrupted there) the
    job is over and nobody maps them again, so this rank removes every rank's name."""
    import torch.distributed as dist

    from spd_ext.deepspeed import release_deepspeed_shm_name

    try:
        release_deepspeed_shm_name()
    except BaseException:
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        for rank in range(dist.get_world_size()):  # named as release_deepspeed_shm_name does
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_"
                          f"{rank}")
        raise
