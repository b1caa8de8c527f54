"""`spd-ext report` (the C++ ops: compatible, built, in use) and `spd-ext clean` (what dead
jobs left in /dev/shm and the JIT cache)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform

from spd_ext.cli.flags import Help


def add_parser(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    if name == "report":
        p = sub.add_parser(
            name, formatter_class=Help, help=help,
            description="Report every C++ op of spd_ext: whether it can be built here and "
            "why not, whether it is built (prebuilt or JIT cache), which implementation "
            "runs, and its compiler flags.")
        p.add_argument("--build", action="store_true",
                       help="build (JIT) every compatible op now instead of on first use, "
                       "DeepSpeed's CPU communication op too")
        p.set_defaults(func=lambda args: report(args))
        return
    p = sub.add_parser(
        name, formatter_class=Help, help=help,
        description="List and remove /dev/shm segments that outlived their job: spd_ext's "
        "(left when a rank is killed while a group sets up; the creating process is gone) and "
        "DeepSpeed's CPU all-reduce buffers that no process maps any more; and torch's `lock` "
        "files in the JIT ops cache left by a build that was killed (no live process holds "
        "the build lock; the next load of the op would also remove it).")
    p.add_argument("--dry-run", action="store_true", help="list them, remove nothing")
    # looked up when called, so that a test can stand in for it
    p.set_defaults(func=lambda args: clean(args))


def clean(args: argparse.Namespace) -> int:
    from spd_ext.comm.segments import remove_stale_segments, stale_segments
    from spd_ext.ops.build_lock import remove_stale_build_locks, stale_build_locks
    from spd_ext.ops.builder import cache_root

    found = stale_segments() if args.dry_run else remove_stale_segments(deepspeed=True)
    verb = "stale" if args.dry_run else "removed"
    for segment in found:
        print(f"{verb}: {segment.path} ({segment.size / 2**20:.1f} MiB; {segment.reason})")
    total = sum(s.size for s in found) / 2**20
    print(f"{len(found)} segment(s) {verb}, {total:.1f} MiB" if found else
          "no stale shared-memory segments")
    locks = (stale_build_locks if args.dry_run else remove_stale_build_locks)(cache_root())
    for lock in locks:
        print(f"{verb}: {lock.baton} (build lock no live process holds: its build was killed)")
    print(f"{len(locks)} build lock(s) {verb}" if locks else
          f"no stale build locks in {cache_root()}")
    return 0


def report(args: argparse.Namespace) -> int:
    import torch

    import spd_ext
    from spd_ext.ops import ALL_BUILDERS, host_isa
    from spd_ext.ops.builder import cache_root
    from spd_ext.utils.table import format_table

    print(f"spd_ext {spd_ext.__version__}  torch {torch.__version__}  python "
          f"{platform.python_version()}  {platform.machine()}  {os.cpu_count()} cores")
    print(f"host vector ISA: {host_isa()}   torch threads: {torch.get_num_threads()}   "
          f"CUDA: {torch.cuda.is_available()}")
    print(f"JIT cache: {cache_root()}")
    forced = os.environ.get("SPD_EXT_FORCE_FALLBACK", "0")
    print(f"SPD_EXT_FORCE_FALLBACK={forced}\n")
    rows, locks = [], []
    for b in ALL_BUILDERS:
        if args.build:
            b.load()
        s = b.status()
        rows.append([s.name, "yes" if s.compatible else "no", s.built, s.implementation,
                     s.target, " ".join(s.flags), s.reason or "-"])
        if s.build_lock:
            locks.append(f"build lock of {s.name}: {s.build_lock}")
    print(format_table(["op", "compatible", "built", "in use", "target", "flags", "note"], rows))
    if locks:
        print("\n" + "\n".join(locks))
    if importlib.util.find_spec("deepspeed") is not None:
        from spd_ext.deepspeed.ops import deepspeed_comm_op_state, load_deepspeed_comm_op

        if args.build:
            load_deepspeed_comm_op()
        state = deepspeed_comm_op_state()
        if state:
            print("\n" + state)
    print("\ncomm.all_reduce on CPU float32/bfloat16/float16 tensors: shared-memory kernel "
          "when every rank of the group is on this host and shm_allreduce is in use, else "
          "torch.distributed. CUDA tensors: the CUDA IPC kernel when ipc_allreduce is in use, "
          "the group has 2-8 ranks on this host and the tensor fits the buffer (8 MiB; one "
          "staging copy, none for tensors in spd_ext.comm.ipc_buffer memory), else "
          "torch.distributed (NCCL; PREMUL_SUM for weighted). Other dtypes: "
          "torch.distributed.")
    return 0
