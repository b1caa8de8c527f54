"""`spd-ext` command line: environment report and benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="each op: compatible, built, implementation in use",
                       description="Report every C++ op of spd_ext: whether it can be built "
                       "here and why not, whether it is built (prebuilt or JIT cache), which "
                       "implementation runs, and its compiler flags.")
    p.add_argument("--build", action="store_true",
                   help="build (JIT) every compatible op now instead of on first use")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
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
    rows = []
    for b in ALL_BUILDERS:
        if args.build:
            b.load()
        s = b.status()
        rows.append([s.name, "yes" if s.compatible else "no", s.built, s.implementation,
                     s.isa, " ".join(s.flags), s.reason or "-"])
    print(format_table(["op", "compatible", "built", "in use", "isa", "flags", "note"], rows))
    print("\ncomm.all_reduce on CPU float32/bfloat16/float16 tensors: shared-memory kernel "
          "when every rank of the group is on this host and shm_allreduce is in use, else "
          "torch.distributed (other dtypes and devices always use torch.distributed).")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="kernel and collective microbenchmarks")
    bench = p.add_subparsers(dest="bench", required=True, metavar="{allreduce,reduce}")

    a = bench.add_parser("allreduce", help="all-reduce on N local CPU ranks",
                         description="Time gloo, DeepSpeed's inference_all_reduce (if "
                         "installed), spd_ext sum and spd_ext weighted all-reduce on N local "
                         "CPU ranks and print a table.")
    a.add_argument("--nproc", type=int, default=2, help="ranks to spawn (default 2)")
    a.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32,bf16,fp16")
    a.add_argument("--sizes", default="4K..64M",
                   help="bytes per tensor: LO..HI[:FACTOR] (default factor 4) or a comma list")
    a.add_argument("--impl", default="gloo,deepspeed,spd,spd-weighted",
                   help="comma list of gloo,deepspeed,spd,spd-weighted")
    a.add_argument("--repeats", type=int, default=7, help="timed loops per point (median)")
    a.add_argument("--warmup", type=int, default=5, help="untimed calls per point")
    a.add_argument("--target-ms", type=float, default=20.0,
                   help="approximate duration of one timed loop")
    a.add_argument("--threads-per-rank", type=int, default=None,
                   help="torch/OpenMP threads per rank (default cores // nproc)")
    a.add_argument("--no-bind-cores", dest="bind_cores", action="store_false",
                   help="do not pin each rank to its own cores (pinned when there are enough)")
    a.add_argument("--markdown", action="store_true", help="print a Markdown table")
    a.add_argument("--json", metavar="PATH", help="also write the raw timings as JSON")
    a.set_defaults(func=_bench_allreduce)

    r = bench.add_parser("reduce", help="weighted_reduce vs torch expressions",
                         description="Time weighted_reduce against torch.stack(xs).mul_(w)."
                         "sum(0) and a chain of add_(x, alpha=w), with memcpy bandwidth for "
                         "reference.")
    r.add_argument("--inputs", default="2,4,8", help="comma list of input counts")
    r.add_argument("--sizes", default="64K..64M", help="bytes per input, as for allreduce")
    r.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32,bf16,fp16")
    r.add_argument("--repeats", type=int, default=7, help="timed loops per point (median)")
    r.add_argument("--warmup", type=int, default=3, help="untimed calls per point")
    r.add_argument("--target-ms", type=float, default=50.0,
                   help="approximate duration of one timed loop")
    r.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads")
    r.add_argument("--markdown", action="store_true", help="print a Markdown table")
    r.add_argument("--json", metavar="PATH", help="also write the raw timings as JSON")
    r.set_defaults(func=_bench_reduce)


def _write_json(path: str | None, payload: object) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)


def _bench_allreduce(args: argparse.Namespace) -> int:
    from spd_ext.bench import allreduce

    cfg = allreduce.AllReduceConfig(
        nproc=args.nproc, dtypes=args.dtype, sizes=args.sizes, impls=args.impl,
        warmup=args.warmup, repeats=args.repeats, target_ms=args.target_ms,
        threads_per_rank=args.threads_per_rank, bind_cores=args.bind_cores)
    result = allreduce.run(cfg)
    print(allreduce.describe_run(result, cfg))
    print(allreduce.table(result, cfg, markdown=args.markdown))
    _write_json(args.json, result)
    return 0


def _bench_reduce(args: argparse.Namespace) -> int:
    from spd_ext.bench import reduce

    cfg = reduce.ReduceConfig(inputs=args.inputs, sizes=args.sizes, dtypes=args.dtype,
                              warmup=args.warmup, repeats=args.repeats,
                              target_ms=args.target_ms, threads=args.threads)
    rows = reduce.run(cfg)
    print(reduce.describe_run(cfg))
    print(reduce.table(rows, markdown=args.markdown))
    _write_json(args.json, rows)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spd-ext", description="spd_ext: reduced-communication distributed training "
        "for PyTorch and DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_report(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"spd-ext: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
