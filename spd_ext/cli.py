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
    bench = p.add_subparsers(dest="bench", required=True, metavar="{allreduce,reduce,tp}")

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

    t = bench.add_parser("tp", help="training step time per tensor-parallel sync pattern",
                         description="Time a tensor-parallel training step (forward, backward, "
                         "optimizer) of a small GPT for each sync pattern on N local CPU ranks, "
                         "through torch.distributed and/or spd_ext.comm.")
    t.add_argument("--nproc", type=int, default=2, help="ranks = tensor-parallel size")
    t.add_argument("--patterns", default=None,
                   help="';'-separated patterns (default: tp*12;[tp,spd]*6;spd*12;"
                   "[spd,parallel]*6;grouped:4;ladder*12)")
    t.add_argument("--backends", default="torch,spd", help="comma list of torch,spd")
    t.add_argument("--n-layer", type=int, default=12)
    t.add_argument("--n-embd", type=int, default=64)
    t.add_argument("--n-head", type=int, default=4)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=64)
    t.add_argument("--repeats", type=int, default=7, help="timed loops per pattern (median)")
    t.add_argument("--markdown", action="store_true", help="print a Markdown table")
    t.add_argument("--json", metavar="PATH", help="also write the raw timings as JSON")
    t.set_defaults(func=_bench_tp)


def _add_tp(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tp", help="tensor-parallel sync patterns: counts, sensitivity")
    tp = p.add_subparsers(dest="tp", required=True, metavar="{syncs,sensitivity}")

    s = tp.add_parser("syncs", help="measure a pattern's sync count and parameter count",
                      description="Run one forward and backward pass on the meta device (no "
                      "compute) and print the all-reduces the library counts, per block.")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--pattern", help="e.g. 'tp*12', '[tp,spd]*6', 'grouped:4'")
    src.add_argument("--config", help="a JSON file from configs/tp")
    s.add_argument("--n-layer", type=int, default=12)
    s.add_argument("--n-head", type=int, default=12)
    s.add_argument("--n-embd", type=int, default=768)
    s.add_argument("--vocab-size", type=int, default=50304)
    s.add_argument("--tp-size", type=int, default=2)
    s.set_defaults(func=_tp_syncs)

    v = tp.add_parser("sensitivity", help="loss change when each block alone drops a sync",
                      description="For a trained dense model, the validation loss when each "
                      "block alone becomes an spd block (its attention all-reduce dropped).")
    v.add_argument("--checkpoint", help="ckpt.pt written by an spd_ext experiment (tp*L run)")
    v.add_argument("--hf", help="a local Hugging Face GPT-2 folder instead")
    v.add_argument("--data", default="tinyshakespeare", help="corpus name or path")
    v.add_argument("--tp-size", type=int, default=2, help="emulated shards")
    v.add_argument("--eval-batches", type=int, default=20)
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--markdown", action="store_true", help="print a Markdown table")
    v.set_defaults(func=_tp_sensitivity)


def _add_experiment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="experiments that print tables and write plots")
    ex = p.add_subparsers(dest="experiment", required=True, metavar="{sync-sweep,sadpt}")
    s = ex.add_parser("sync-sweep", help="val loss vs tensor-parallel sync count",
                      description="Train a small char-level GPT on TinyShakespeare for every "
                      "sync pattern (emulated tensor parallelism, same seed, data and steps); "
                      "print val loss against the measured sync count and plot it. Finished "
                      "patterns are kept in OUT/results.json and skipped on a rerun.")
    s.add_argument("--patterns", default=None, help="';'-separated patterns (default: the "
                   "ten GPT-2 124M patterns of configs/tp)")
    s.add_argument("--steps", type=int, default=800)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--n-layer", type=int, default=12)
    s.add_argument("--n-head", type=int, default=4)
    s.add_argument("--n-embd", type=int, default=64)
    s.add_argument("--block-size", type=int, default=128, help="context length")
    s.add_argument("--tp-size", type=int, default=2, help="emulated shards")
    s.add_argument("--eval-interval", type=int, default=200)
    s.add_argument("--eval-batches", type=int, default=20)
    s.add_argument("--data", default="tinyshakespeare", help="corpus name or path")
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--out", default="out/sync-sweep", help="results, checkpoints, plot")
    s.add_argument("--force", action="store_true", help="rerun patterns already in results")
    s.add_argument("--markdown", action="store_true", help="print a Markdown table")
    s.set_defaults(func=_sync_sweep)

    a = ex.add_parser("sadpt", help="signal-aware DP on clean and corrupted shards",
                      description="The seed's signal-aware data-parallel table: 2 ranks IID / "
                      "non-IID (one rank's data corrupted) with uniform or signal-weighted "
                      "aggregation, then 4 ranks with one corrupt rank against the robust "
                      "baselines. Clean validation loss, time, final weights; a plot of weights "
                      "and loss curves. Finished runs are kept in OUT/results.json.")
    a.add_argument("--runs", default=None, help="comma list of run names (default: all: "
                   "iid_uniform, iid_weighted, noniid_uniform, noniid_weighted, 4rank_uniform, "
                   "4rank_weighted, 4rank_trimmed_mean, 4rank_median, 4rank_centered_clipping)")
    a.add_argument("--corruption", default="token_swap",
                   help="token_swap, shuffle, label_noise or duplicate")
    a.add_argument("--corruption-prob", type=float, default=0.3)
    a.add_argument("--signal", default="loss_ema",
                   help="loss_ema, grad_norm_stability or cosine_to_prev_global")
    a.add_argument("--weighting", default="softmax", help="softmax or inverse")
    a.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    a.add_argument("--floor", type=float, default=0.05, help="minimum weight of any rank")
    a.add_argument("--weight-ema", type=float, default=0.0, help="EMA smoothing of weights")
    a.add_argument("--warmup", type=int, default=20, help="steps of uniform weights first")
    a.add_argument("--steps", type=int, default=500)
    a.add_argument("--batch-size", type=int, default=16, help="per rank")
    a.add_argument("--lr", type=float, default=2e-3)
    a.add_argument("--n-layer", type=int, default=4)
    a.add_argument("--n-head", type=int, default=4)
    a.add_argument("--n-embd", type=int, default=96)
    a.add_argument("--block-size", type=int, default=64)
    a.add_argument("--eval-interval", type=int, default=50)
    a.add_argument("--eval-batches", type=int, default=10)
    a.add_argument("--data", default="tinyshakespeare", help="corpus name or path")
    a.add_argument("--seed", type=int, default=1337)
    a.add_argument("--out", default="out/sadpt", help="results, logs, plot")
    a.add_argument("--force", action="store_true", help="rerun runs already in results")
    a.add_argument("--markdown", action="store_true", help="print a Markdown table")
    a.set_defaults(func=_sadpt)


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


def _bench_tp(args: argparse.Namespace) -> int:
    from spd_ext.bench import tp

    cfg = tp.TPBenchConfig(nproc=args.nproc, backends=args.backends, n_layer=args.n_layer,
                           n_embd=args.n_embd, n_head=args.n_head, batch_size=args.batch_size,
                           seq_len=args.seq_len, repeats=args.repeats)
    if args.patterns:
        cfg.patterns = args.patterns
    rows = tp.run(cfg)
    print(tp.describe_run(cfg))
    print(tp.table(rows, markdown=args.markdown))
    _write_json(args.json, rows)
    return 0


def _tp_syncs(args: argparse.Namespace) -> int:
    import torch

    from spd_ext.tp import GPTConfig, ReducedSyncGPT
    from spd_ext.utils.table import format_table

    if args.config:
        with open(args.config) as f:
            spec = json.load(f)
        config = GPTConfig(**spec["model"])
    else:
        config = GPTConfig(pattern=args.pattern, n_layer=args.n_layer, n_head=args.n_head,
                           n_embd=args.n_embd, vocab_size=args.vocab_size, tp_size=args.tp_size)
    with torch.device("meta"):
        model = ReducedSyncGPT(config, seed=None)
        idx = torch.zeros(1, 4, dtype=torch.long)
        _, loss = model(idx, idx)
        loss.backward()
    counts = model.sync_counter.step()
    print(f"pattern {config.pattern}: {counts['forward']} forward and {counts['backward']} "
          f"backward all-reduces per step, {model.num_params():,} parameters")
    order = sorted(counts["blocks"].items(),
                   key=lambda kv: int(kv[0].split(":")[0]) if kv[0][0].isdigit() else 1 << 30)
    rows = [[label, f, b] for label, (f, b) in order]
    print(format_table(["block", "forward", "backward"], rows))
    return 0


def _tp_sensitivity(args: argparse.Namespace) -> int:
    from spd_ext.experiments import sensitivity

    cfg = sensitivity.SensitivityConfig(checkpoint=args.checkpoint, hf=args.hf, corpus=args.data,
                                        tp_size=args.tp_size, eval_batches=args.eval_batches,
                                        batch_size=args.batch_size)
    print(sensitivity.table(sensitivity.run(cfg), markdown=args.markdown))
    return 0


def _sync_sweep(args: argparse.Namespace) -> int:
    from spd_ext.experiments import sync_sweep
    from spd_ext.train import TrainConfig

    cfg = sync_sweep.SyncSweepConfig(
        n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
        tp_size=args.tp_size, corpus=args.data, seed=args.seed, out_dir=args.out,
        force=args.force,
        train=TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          min_lr=args.lr / 10, warmup_steps=min(50, args.steps // 10),
                          eval_interval=args.eval_interval, eval_batches=args.eval_batches,
                          log_interval=max(1, min(50, args.steps // 10))))
    if args.patterns:
        cfg.patterns = tuple(p.strip() for p in args.patterns.split(";") if p.strip())
    rows = sync_sweep.run(cfg)
    print(sync_sweep.table(rows, markdown=args.markdown))
    print(f"results: {args.out}/results.json, plot: {args.out}/sync_sweep.png")
    return 0


def _sadpt(args: argparse.Namespace) -> int:
    from spd_ext.data import Corruption
    from spd_ext.experiments import sadpt
    from spd_ext.train import TrainConfig

    runs = sadpt.default_runs()
    if args.runs:
        wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
        known = {r.name: r for r in runs}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise ValueError(f"unknown run(s) {unknown}; choose from {', '.join(known)}")
        runs = tuple(known[w] for w in wanted)
    cfg = sadpt.SADPTConfig(
        runs=runs, corruption=Corruption(args.corruption, args.corruption_prob, seed=args.seed),
        signal=args.signal, weighting=args.weighting, temperature=args.temperature,
        floor=args.floor, weight_ema=args.weight_ema, warmup_steps=args.warmup,
        n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
        block_size=args.block_size, corpus=args.data, seed=args.seed, out_dir=args.out,
        force=args.force,
        train=TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          min_lr=args.lr / 10, warmup_steps=min(30, args.steps // 10),
                          eval_interval=args.eval_interval, eval_batches=args.eval_batches,
                          log_interval=max(1, min(50, args.steps // 10))))
    rows = sadpt.run(cfg)
    print(sadpt.table(rows, markdown=args.markdown))
    print(f"results: {args.out}/results.json, plot: {args.out}/sadpt.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spd-ext", description="spd_ext: reduced-communication distributed training "
        "for PyTorch and DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_report(sub)
    _add_bench(sub)
    _add_tp(sub)
    _add_experiment(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"spd-ext: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
