"""`spd-ext` command line: environment report, benchmarks, experiments and training."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

from spd_ext.comm.backend import SPD_EXT, TP_BACKENDS
from spd_ext.errors import UsageError
from spd_ext.utils.files import write_json


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every --help shows the defaults, once: a help that says its default in words
    (a default of None meaning "the checkpoint's", "all", ...) gets no "(default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default:" in action.help:
            return action.help
        return super()._get_help_string(action)


def _bounded(kind: type, low: float, *, low_open: bool = False, high: float | None = None,
             high_open: bool = False):
    """An argparse type: a ``kind`` number within bounds, so a bad flag is one usage line
    before anything runs (no traceback from inside a rank)."""
    lower = f"> {low}" if low_open else f">= {low}"
    what = ("an integer " if kind is int else "a finite number ") + lower + (
        "" if high is None else f" and {'<' if high_open else '<='} {high}")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = high is not None and (value >= high if high_open else value > high)
        # NaN fails every comparison; inf is no count of seconds or tokens either
        if too_low or too_high or value != value or value in (math.inf, -math.inf):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


POSITIVE = _bounded(int, 1)
NONNEGATIVE = _bounded(int, 0)
POSITIVE_FLOAT = _bounded(float, 0.0, low_open=True)
PROBABILITY = _bounded(float, 0.0, high=1.0)


def _command(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=_Help, **kwargs)


# What the flags many commands share mean (_standard_arg).
_STANDARD_HELP = {
    "n_layer": "transformer blocks", "n_head": "attention heads", "n_embd": "model width",
    "vocab_size": "vocabulary size", "seq_len": "tokens per sequence",
    "batch_size": "sequences per step (per rank where ranks run)", "steps": "training steps",
    "eval_interval": "steps between evaluations (0: only at the end)",
    "eval_batches": "batches per evaluation", "seed": "random seed",
}


def _standard_arg(p: argparse.ArgumentParser, flag: str, **kwargs) -> argparse.Action:
    """``p.add_argument(flag, ...)`` with the shared meaning of the flag as its help."""
    return p.add_argument(flag, help=_STANDARD_HELP[flag[2:].replace("-", "_")], **kwargs)


def _add_table_args(p: argparse.ArgumentParser) -> None:
    """The output options every benchmark shares."""
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--json", metavar="PATH", help="also write the raw timings as JSON")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "report", help="each op: compatible, built, implementation in use",
                 description="Report every C++ op of spd_ext: whether it can be built "
                 "here and why not, whether it is built (prebuilt or JIT cache), which "
                 "implementation runs, and its compiler flags.")
    p.add_argument("--build", action="store_true",
                   help="build (JIT) every compatible op now instead of on first use, "
                   "DeepSpeed's CPU communication op too")
    p.set_defaults(func=_report)


def _add_clean(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "clean", help="remove shared-memory segments and build locks left "
                 "by dead jobs",
                 description="List and remove /dev/shm segments that outlived their job: "
                 "spd_ext's (left when a rank is killed while a group sets up; the creating "
                 "process is gone) and DeepSpeed's CPU all-reduce buffers that no process "
                 "maps any more; and torch's `lock` files in the JIT ops cache left by a "
                 "build that was killed (no live process holds the build lock; the next "
                 "load of the op would also remove it).")
    p.add_argument("--dry-run", action="store_true", help="list them, remove nothing")
    p.set_defaults(func=_clean)


def _clean(args: argparse.Namespace) -> int:
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


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "bench", help="kernel and collective microbenchmarks")
    # No metavar: argparse names every subcommand added below in the usage line.
    bench = p.add_subparsers(dest="bench", required=True)

    a = _command(bench, "allreduce", help="all-reduce on N local CPU ranks",
                 description="Time gloo, DeepSpeed's inference_all_reduce (if "
                 "installed), spd_ext sum and spd_ext weighted all-reduce on N local "
                 "CPU ranks and print a table.")
    a.add_argument("--nproc", type=POSITIVE, default=2, help="ranks to spawn (default 2)")
    a.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32,bf16,fp16")
    a.add_argument("--sizes", default="4K..64M",
                   help="bytes per tensor: LO..HI[:FACTOR] (default factor 4) or a comma list")
    a.add_argument("--impl", default="gloo,deepspeed,spd_ext,spd_ext-weighted",
                   help="comma list of gloo,deepspeed,spd_ext,spd_ext-weighted, and with "
                   "--device cuda spd_ext-registered (a registered buffer: no staging copy) and "
                   "spd_ext-graph "
                   "(the same in a replayed CUDA graph: close to kernel time)")
    a.add_argument("--repeats", type=POSITIVE, default=7, help="timed loops per point (median)")
    a.add_argument("--warmup", type=NONNEGATIVE, default=5, help="untimed calls per point")
    a.add_argument("--target-ms", type=float, default=20.0,
                   help="approximate duration of one timed loop")
    a.add_argument("--threads-per-rank", type=POSITIVE, default=None,
                   help="torch/OpenMP threads per rank (default cores // nproc)")
    a.add_argument("--device", default="cpu",
                   help="cpu, or cuda (every rank on GPU 0: the CUDA IPC path)")
    a.add_argument("--no-bind-cores", dest="bind_cores", action="store_false",
                   help="do not pin each rank to its own cores (pinned when there are enough)")
    a.add_argument("--gap-us", type=_bounded(float, 0.0, high=1e6), default=0.0,
                   help="busy compute before every call, as a model's forward has between "
                   "its all-reduces (the time shown is the call's alone; CPU only)")
    _add_table_args(a)
    a.set_defaults(func=_bench_allreduce)

    r = _command(bench, "reduce", help="weighted_reduce vs torch expressions",
                 description="Time weighted_reduce against torch.stack(xs).mul_(w)."
                 "sum(0) and a chain of add_(x, alpha=w), with memcpy bandwidth for "
                 "reference.")
    r.add_argument("--inputs", default="2,4,8", help="comma list of input counts")
    r.add_argument("--sizes", default="64K..64M", help="bytes per input, as for allreduce")
    r.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32,bf16,fp16")
    r.add_argument("--repeats", type=POSITIVE, default=7, help="timed loops per point (median)")
    r.add_argument("--warmup", type=NONNEGATIVE, default=3, help="untimed calls per point")
    r.add_argument("--target-ms", type=float, default=50.0,
                   help="approximate duration of one timed loop")
    r.add_argument("--threads", type=POSITIVE, default=None, help="torch/OpenMP threads")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    _add_table_args(r)
    r.set_defaults(func=_bench_reduce)

    q = _command(bench, "quant", help="8-bit block quantize / dequantize bandwidth",
                 description="Time 8-bit block quantization and dequantization (kernel and "
                 "PyTorch) against a copy of the same tensor.")
    q.add_argument("--sizes", default="64K..64M", help="bytes per tensor, as for allreduce")
    q.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32,bf16,fp16")
    q.add_argument("--block-size", type=POSITIVE, default=256,
                   help="elements sharing one scale (quantization block)")
    q.add_argument("--device", default="cpu", help="cpu or cuda")
    q.add_argument("--repeats", type=POSITIVE, default=7, help="timed loops per point (median)")
    _add_table_args(q)
    q.set_defaults(func=_bench_quant)

    t = _command(bench, "tp", help="training step time per tensor-parallel sync pattern",
                 description="Time a tensor-parallel training step (forward, backward, "
                 "optimizer) of a small GPT for each sync pattern on N local CPU ranks, "
                 "through torch.distributed and/or spd_ext.comm.")
    _add_tp_bench_args(t, "ladder*12", n_embd=64)
    _standard_arg(t, "--batch-size", type=POSITIVE, default=8)
    _standard_arg(t, "--seq-len", type=POSITIVE, default=64)
    t.add_argument("--repeats", type=POSITIVE, default=7, help="timed loops per pattern (median)")
    t.add_argument("--compile", action="store_true",
                   help="also time each pattern under torch.compile(model, fullgraph=True) "
                   "(spd_ext's collectives are torch operators; compiling takes a while)")
    _add_table_args(t)
    t.set_defaults(func=_bench_tp)

    g = _command(bench, "generate", help="KV-cached generation latency per sync pattern",
                 description="Time KV-cached generation of a 12-layer GPT for each sync "
                 "pattern on N local CPU ranks (tensor parallel N): prefill time, per-token "
                 "decode latency p50/p99 and tokens/s, over torch.distributed and/or "
                 "spd_ext.comm, for each batch size.")
    _add_tp_bench_args(g, "parallel*12", n_embd=128)
    g.add_argument("--batch-sizes", default="1,8", help="comma list of sequences per batch")
    g.add_argument("--vocab-size", type=POSITIVE, default=50304,
                   help="GPT-2's padded vocabulary by default")
    g.add_argument("--prompt-len", type=POSITIVE, default=32, help="prompt tokens (prefill)")
    g.add_argument("--new-tokens", type=POSITIVE, default=64, help="tokens decoded per repeat")
    g.add_argument("--repeats", type=POSITIVE, default=5, help="timed generations per point")
    _add_table_args(g)
    g.set_defaults(func=_bench_generate)

    d = _command(bench, "deepspeed", help="DeepSpeed engine step and gradient reduction",
                 description="Time a DeepSpeed (fp32) training step of a GPT of about "
                 "10M parameters on N local CPU ranks and its gradient reduction: DeepSpeed's "
                 "own reduction vs spd_ext's fused all-reduce (\"comm\": {\"backend\": "
                 "\"spd_ext\"}, stage 0 only), plain and signal-weighted, at a ZeRO stage.")
    _add_training_step_args(d, ("deepspeed", "deepspeed-weighted", "spd_ext",
                                "spd_ext-weighted"),
                            steps=10)
    d.add_argument("--stage", type=int, choices=(0, 1, 2, 3), default=0,
                   help="ZeRO stage of the engines (default 0; the spd_ext variants need 0)")
    d.set_defaults(variants="")  # every variant the stage allows
    d.set_defaults(func=_bench_deepspeed)

    h = _command(bench, "ddp-hook", help="DDP step: signal-weighted hook vs DDP's default",
                 description="Time a DistributedDataParallel training step of a GPT of about "
                 "10M parameters on N local CPU ranks with DDP's default all-reduce hook, "
                 "spd_ext's signal-weighted hook (asynchronous: overlaps backward), and the "
                 "same hook waiting for each bucket; the same buckets and bytes in each.")
    _add_training_step_args(h, ("default", "weighted", "weighted-sync"), steps=15)
    h.add_argument("--bucket-mb", type=float, default=4.0, help="DDP's bucket_cap_mb")
    h.set_defaults(func=_bench_ddp_hook)


def _add_tp_bench_args(p: argparse.ArgumentParser, last_pattern: str, n_embd: int) -> None:
    """The arguments of the tensor-parallel benchmarks (bench tp, bench generate)."""
    p.add_argument("--nproc", type=POSITIVE, default=2, help="ranks = tensor-parallel size")
    p.add_argument("--patterns", default=None,
                   help="';'-separated patterns (default: tp*12;[tp,spd]*6;spd*12;"
                   f"[spd,parallel]*6;grouped:4;{last_pattern})")
    p.add_argument("--backends", default="torch,spd_ext",
                   help="comma list of torch (torch.distributed) and spd_ext (spd_ext.comm)")
    _standard_arg(p, "--n-layer", type=POSITIVE, default=12)
    _standard_arg(p, "--n-embd", type=POSITIVE, default=n_embd)
    _standard_arg(p, "--n-head", type=POSITIVE, default=4)


def _add_training_step_args(p: argparse.ArgumentParser, variants: tuple[str, ...],
                            steps: int) -> None:
    """The arguments of the training-step benchmarks (bench deepspeed, bench ddp-hook)."""
    p.add_argument("--nproc", type=POSITIVE, default=2, help="data-parallel ranks")
    p.add_argument("--variants", default=",".join(variants),
                   help=f"comma list of {', '.join(variants)}")
    p.add_argument("--n-layer", type=POSITIVE, default=6, help="transformer blocks")
    p.add_argument("--n-embd", type=POSITIVE, default=384, help="model width")
    p.add_argument("--n-head", type=POSITIVE, default=6, help="attention heads")
    p.add_argument("--batch-size", type=POSITIVE, default=4, help="sequences per rank and step")
    p.add_argument("--seq-len", type=POSITIVE, default=64, help="tokens per sequence")
    p.add_argument("--warmup", type=NONNEGATIVE, default=3, help="untimed steps per variant")
    p.add_argument("--steps", type=POSITIVE, default=steps,
                   help="timed steps per variant (median)")
    _add_table_args(p)


def _training_step_config(cls: type, args: argparse.Namespace, **extra: object):  # noqa: ANN202
    return cls(nproc=args.nproc, variants=args.variants, n_layer=args.n_layer,
               n_embd=args.n_embd, n_head=args.n_head, batch_size=args.batch_size,
               seq_len=args.seq_len, warmup=args.warmup, steps=args.steps, **extra)


def _add_tp(sub: argparse._SubParsersAction) -> None:
    p = _command(sub, "tp", help="tensor-parallel sync patterns: counts, sensitivity")
    tp = p.add_subparsers(dest="tp", required=True, metavar="{syncs,sensitivity}")

    s = _command(tp, "syncs", help="measure a pattern's sync count and parameter count",
                 description="Run one forward and backward pass on the meta device (no "
                 "compute) and print the all-reduces the library counts, per block.")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--pattern", help="e.g. 'tp*12', '[tp,spd]*6', 'grouped:4'")
    src.add_argument("--config", help="a JSON file from configs/tp")
    _standard_arg(s, "--n-layer", type=POSITIVE, default=12)
    _standard_arg(s, "--n-head", type=POSITIVE, default=12)
    _standard_arg(s, "--n-embd", type=POSITIVE, default=768)
    _standard_arg(s, "--vocab-size", type=POSITIVE, default=50304)
    s.add_argument("--tp-size", type=POSITIVE, default=2, help="tensor-parallel size")
    s.set_defaults(func=_tp_syncs)

    v = _command(tp, "sensitivity", help="loss change when each block alone drops a sync",
                 description="For a trained dense model, the validation loss when each "
                 "block alone becomes an spd block (its attention all-reduce dropped).")
    v.add_argument("--checkpoint", help="ckpt.pt written by an spd_ext experiment (tp*L run)")
    v.add_argument("--hf", help="a local Hugging Face GPT-2 folder instead")
    v.add_argument("--data", default="tinyshakespeare", help="corpus name or path")
    v.add_argument("--tp-size", type=POSITIVE, default=2, help="emulated shards")
    _standard_arg(v, "--eval-batches", type=POSITIVE, default=20)
    _standard_arg(v, "--batch-size", type=POSITIVE, default=16)
    v.add_argument("--markdown", action="store_true", help="print a Markdown table")
    v.set_defaults(func=_tp_sensitivity)


def _add_gpt_args(p: argparse.ArgumentParser, defaults) -> None:
    """Model-shape flags; ``defaults`` is the experiment's config (the one source of them)."""
    _standard_arg(p, "--n-layer", type=POSITIVE, default=defaults.n_layer)
    _standard_arg(p, "--n-head", type=POSITIVE, default=defaults.n_head)
    _standard_arg(p, "--n-embd", type=POSITIVE, default=defaults.n_embd)
    p.add_argument("--block-size", type=POSITIVE, default=defaults.block_size,
                   help="context length")


def _add_train_args(p: argparse.ArgumentParser, train) -> None:
    _standard_arg(p, "--steps", type=POSITIVE, default=train.max_steps)
    _standard_arg(p, "--batch-size", type=POSITIVE, default=train.batch_size)
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=train.lr,
                   help="peak learning rate (cosine to lr/10)")
    _standard_arg(p, "--eval-interval", type=NONNEGATIVE, default=train.eval_interval)
    _standard_arg(p, "--eval-batches", type=POSITIVE, default=train.eval_batches)


def _add_run_args(p: argparse.ArgumentParser, defaults) -> None:
    p.add_argument("--data", default=defaults.corpus, help="corpus name or path")
    _standard_arg(p, "--seed", type=int, default=defaults.seed)
    p.add_argument("--out", default=defaults.out_dir, help="results, logs, checkpoints, plot")
    p.add_argument("--force", action="store_true", help="rerun the selected runs even if they "
                   "are already in OUT/results.json")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")


def _train_config(args: argparse.Namespace):
    from spd_ext.train import TrainConfig

    return TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       min_lr=args.lr / 10, warmup_steps=min(50, args.steps // 10),
                       eval_interval=args.eval_interval, eval_batches=args.eval_batches,
                       log_interval=max(1, min(50, args.steps // 10)))


def _add_experiment(sub: argparse._SubParsersAction) -> None:
    from spd_ext.dp import SIGNALS, WEIGHT_MAPS
    from spd_ext.experiments.sadpt import SADPTConfig
    from spd_ext.experiments.staleness import StalenessConfig
    from spd_ext.experiments.sync_sweep import SyncSweepConfig

    sweep, dp, stale = SyncSweepConfig(), SADPTConfig(), StalenessConfig()
    p = _command(sub, "experiment", help="experiments that print tables and write plots")
    ex = p.add_subparsers(dest="experiment", required=True,
                          metavar="{sync-sweep,sadpt,staleness}")
    s = _command(ex, "sync-sweep", help="val loss vs tensor-parallel sync count",
                 description="Train a small char-level GPT on TinyShakespeare for every "
                 "sync pattern (emulated tensor parallelism, same seed, data and steps); "
                 "print val loss against the measured sync count and plot it. Finished "
                 "patterns are kept in OUT/results.json and skipped on a rerun.")
    s.add_argument("--patterns", default=None, help="';'-separated patterns (default: the "
                   "ten GPT-2 124M patterns of configs/tp)")
    s.add_argument("--tp-size", type=POSITIVE, default=sweep.tp_size, help="emulated shards")
    _add_gpt_args(s, sweep)
    _add_train_args(s, sweep.train)
    _add_run_args(s, sweep)
    s.set_defaults(func=_sync_sweep)

    a = _command(ex, "sadpt", help="signal-aware DP on clean and corrupted shards",
                 description="The signal-aware data-parallel table: 2 ranks IID / "
                 "non-IID (one rank's data corrupted) with uniform or signal-weighted "
                 "aggregation, then 4 ranks with one corrupt rank against the robust "
                 "baselines. Clean validation loss, time, final weights; a plot of weights "
                 "and loss curves. Finished runs are kept in OUT/results.json.")
    a.add_argument("--runs", default=None, help="comma list of run names (default: all: "
                   "iid_uniform, iid_weighted, noniid_uniform, noniid_weighted, 4rank_uniform, "
                   "4rank_weighted, 4rank_trimmed_mean, 4rank_median, 4rank_centered_clipping)")
    a.add_argument("--corruption", default=dp.corruption.kind,
                   help="token_swap, shuffle, label_noise or duplicate")
    a.add_argument("--corruption-prob", type=PROBABILITY, default=dp.corruption.probability,
                   help="probability that each token (window, target) of the corrupted "
                   "shard is changed")
    a.add_argument("--signal", default=dp.signal, choices=sorted(SIGNALS),
                   help="per-rank trust signal")
    a.add_argument("--weighting", default=dp.weighting, choices=sorted(WEIGHT_MAPS),
                   help="signals -> weights")
    a.add_argument("--temperature", type=POSITIVE_FLOAT, default=dp.temperature,
                   help="softmax temperature")
    a.add_argument("--floor", type=_bounded(float, 0.0, high=1.0, high_open=True), default=dp.floor,
                   help="minimum weight of any rank (at most 1/ranks)")
    a.add_argument("--weight-ema", type=_bounded(float, 0.0, high=1.0, high_open=True),
                   default=dp.weight_ema,
                   help="EMA smoothing of weights")
    a.add_argument("--warmup", type=NONNEGATIVE, default=dp.warmup_steps,
                   help="steps of uniform weights first")
    _add_gpt_args(a, dp)
    _add_train_args(a, dp.train)
    _add_run_args(a, dp)
    a.set_defaults(func=_sadpt)

    st = _command(ex, "staleness", help="sync vs async vs local modes under a straggler",
                  description="Train the XOR logistic regression and a small char GPT "
                  "with every staleness mode on N CPU ranks, with and without a straggler "
                  "(the first worker F times slower every E steps): final loss, steps and "
                  "seconds to a target loss, staleness, idle time, messages per step; a "
                  "plot of loss against wall-clock. Finished runs are kept in "
                  "OUT/results.json.")
    st.add_argument("--modes", default=None, help="comma list (default: ssgd, delayed:2, "
                    "local_sgd:8, diloco:8, ssp:2, asgd, syncps)")
    st.add_argument("--tasks", default="xor,gpt", help="comma list of xor, gpt")
    st.add_argument("--straggler", default="both", choices=["both", "off", "on"],
                    help="run without, with, or both")
    st.add_argument("--nproc", type=_bounded(int, 2), default=stale.nproc,
                    help="ranks (PS modes: 1 server + N-1 workers)")
    st.add_argument("--straggler-factor", type=_bounded(float, 1.0),
                    default=stale.straggler_factor,
                    help="the slow rank's step delay, in multiples of the others'")
    st.add_argument("--straggler-every", type=POSITIVE, default=stale.straggler_every,
                    help="the slow rank is slow on every N-th step")
    st.add_argument("--xor-steps", type=POSITIVE, default=None,
                    help=f"default {stale.task('xor').steps}")
    st.add_argument("--gpt-steps", type=POSITIVE, default=None,
                    help=f"default {stale.task('gpt').steps}")
    _add_run_args(st, stale)
    st.set_defaults(func=_staleness)


class _HelpAsWritten(_Help, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, description and epilog as written (config keys one per line,
    example commands on lines of their own)."""


def _add_train(sub: argparse._SubParsersAction) -> None:
    from spd_ext.train.config import options_help
    from spd_ext.train.run import add_arguments

    p = sub.add_parser(
        "train", formatter_class=_HelpAsWritten, help="train a GPT from a YAML/JSON run config",
        description="Train a reduced-sync GPT through spd_ext.deepspeed from one YAML or JSON "
        "file (sections model, data, training, parallel, deepspeed, sample, wandb).\nThe "
        "config is checked before any rank starts; a mistake is one line naming the key and "
        "the fix.\n\n  spd-ext train configs/train/quickstart.yaml\n  spd-ext train "
        "configs/train/quickstart.yaml --nproc 2 --set parallel.tp=2 --set "
        "model.pattern='spd*2' --set training.out_dir=out/quickstart-tp2\n  deepspeed "
        "--num_gpus 8 --module spd_ext.train.run CONFIG   (or "
        "torchrun ... -m spd_ext.train.run CONFIG)\n\nRank 0 prints progress and writes "
        "OUT_DIR/log.jsonl, loss.png, sample.txt, summary.json, model.pt (for spd-ext serve) "
        "and checkpoints/.",
        epilog="config keys (section.key = default):\n" + options_help())
    add_arguments(p)
    p.add_argument("--nproc", type=POSITIVE, default=None,
                   help="start N local ranks under the deepspeed launcher (default: 1 rank "
                   "in this process, or the ranks of the launcher this runs under)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, print it resolved and the ds_config, train nothing")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from spd_ext.train import run as train_run
    from spd_ext.train.config import describe

    launched = train_run.launched_world_size()
    if args.nproc is not None and launched is not None:
        raise UsageError(f"--nproc {args.nproc} starts a launcher, but this process already "
                         f"runs under one (WORLD_SIZE={launched}); drop --nproc")
    world = args.nproc or launched or 1
    plan, facts = train_run.prepare(args.config, args.overrides, world, args.resume,
                                    args.overwrite, hold=not args.dry_run,
                                    dry_run=args.dry_run)
    if args.dry_run:
        print(describe(plan.cfg).rstrip())
        print(f"# {world} rank(s): tp {plan.tp}, islands {plan.islands}, data parallel "
              f"{plan.data_world}; corpus vocabulary {facts['vocab_size']}; out_dir "
              f"{plan.out_dir}" + (f"; resume from {facts['resume_tag']}"
                                   if "resume_tag" in facts else ""))
        print("# ds_config: " + json.dumps(plan.ds_config))
        if "checkpoints_note" in facts:
            print(f"# note: {facts['checkpoints_note']}")
        return 0
    if args.nproc is not None:  # the launched rank 0 says the resume note, as it does alone
        return train_run.launch(args.config, args.overrides, args.nproc, args.resume,
                                args.overwrite)
    train_run.single_process_environment()
    return train_run.run(plan, facts, resume=args.resume)


def _write_json(path: str | None, payload: object) -> None:
    if path:
        write_json(Path(path), payload)


def _bench_allreduce(args: argparse.Namespace) -> int:
    from spd_ext.bench import allreduce

    cfg = allreduce.AllReduceConfig(
        nproc=args.nproc, dtypes=args.dtype, sizes=args.sizes, impls=args.impl,
        warmup=args.warmup, repeats=args.repeats, target_ms=args.target_ms,
        threads_per_rank=args.threads_per_rank, bind_cores=args.bind_cores, device=args.device,
        gap_us=args.gap_us)
    result = allreduce.run(cfg)
    print(allreduce.describe_run(result, cfg))
    print(allreduce.table(result, cfg, markdown=args.markdown))
    _write_json(args.json, result)
    return 0


def _bench_reduce(args: argparse.Namespace) -> int:
    from spd_ext.bench import reduce

    cfg = reduce.ReduceConfig(inputs=args.inputs, sizes=args.sizes, dtypes=args.dtype,
                              warmup=args.warmup, repeats=args.repeats,
                              target_ms=args.target_ms, threads=args.threads,
                              device=args.device)
    rows = reduce.run(cfg)
    print(reduce.describe_run(cfg))
    print(reduce.table(rows, markdown=args.markdown))
    _write_json(args.json, rows)
    return 0


def _bench_quant(args: argparse.Namespace) -> int:
    from spd_ext.bench import quant

    cfg = quant.QuantBenchConfig(sizes=args.sizes, dtypes=args.dtype, block_size=args.block_size,
                                 device=args.device, repeats=args.repeats)
    rows = quant.run(cfg)
    print(quant.describe_run(cfg))
    print(quant.table(rows, cfg.block_size, markdown=args.markdown))
    _write_json(args.json, rows)
    return 0


def _bench_tp(args: argparse.Namespace) -> int:
    from spd_ext.bench import tp

    cfg = tp.TPBenchConfig(nproc=args.nproc, backends=args.backends, n_layer=args.n_layer,
                           n_embd=args.n_embd, n_head=args.n_head, batch_size=args.batch_size,
                           seq_len=args.seq_len, repeats=args.repeats, compile=args.compile)
    if args.patterns:
        cfg.patterns = args.patterns
    rows = tp.run(cfg)
    print(tp.describe_run(cfg))
    print(tp.table(rows, markdown=args.markdown))
    _write_json(args.json, rows)
    return 0


def _bench_generate(args: argparse.Namespace) -> int:
    from spd_ext.bench import generate

    cfg = generate.GenerateBenchConfig(
        nproc=args.nproc, backends=args.backends, batch_sizes=args.batch_sizes,
        n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
        vocab_size=args.vocab_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
        repeats=args.repeats)
    if args.patterns:
        cfg.patterns = args.patterns
    rows = generate.run(cfg)
    print(generate.describe_run(cfg))
    print(generate.table(rows, markdown=args.markdown))
    _write_json(args.json, rows)
    return 0


def _bench_deepspeed(args: argparse.Namespace) -> int:
    from spd_ext.bench import ds_engine

    cfg = _training_step_config(ds_engine.DeepSpeedBenchConfig, args, stage=args.stage)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UsageError("spd-ext bench deepspeed needs DeepSpeed: pip install "
                         "'spd_ext[deepspeed]'") from None
    rows = ds_engine.run(cfg)
    print(ds_engine.describe_run(cfg, rows))
    print(ds_engine.table(rows, markdown=args.markdown))
    _write_json(args.json, rows)
    return 0


def _bench_ddp_hook(args: argparse.Namespace) -> int:
    from spd_ext.bench import ddp_hook

    cfg = _training_step_config(ddp_hook.DDPHookBenchConfig, args, bucket_mb=args.bucket_mb)
    rows = ddp_hook.run(cfg)
    print(ddp_hook.describe_run(cfg, rows))
    print(ddp_hook.table(rows, markdown=args.markdown))
    _write_json(args.json, rows)
    return 0


def _gpt_config_file(path: str):
    """The ``"model"`` section of a JSON config as a GPTConfig; every mistake in the file
    is one message naming the file."""
    import difflib
    from dataclasses import fields

    from spd_ext.tp import GPTConfig

    if not Path(path).is_file():
        raise UsageError(f"--config {path} is not a file; pass a JSON file such as "
                         "configs/tp/gpt2-124m-12sync.json")
    try:
        spec = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON: line {exc.lineno} column {exc.colno}: "
                         f"{exc.msg}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a text (JSON) file") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise UsageError(f"{path} has no \"model\" object; a config holds "
                         "{\"model\": {\"pattern\": ..., \"n_layer\": ..., ...}}")
    valid = [f.name for f in fields(GPTConfig)]
    for key in spec["model"]:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"{path}: unknown model field {key!r}{hint} (fields: "
                             f"{', '.join(valid)})")
    try:
        return GPTConfig(**spec["model"])
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path}: {exc}") from None


def _tp_syncs(args: argparse.Namespace) -> int:
    import torch

    from spd_ext.tp import GPTConfig, ReducedSyncGPT
    from spd_ext.utils.table import format_table

    if args.config:
        config = _gpt_config_file(args.config)
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

    cfg = sync_sweep.SyncSweepConfig(
        n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
        tp_size=args.tp_size, corpus=args.data, seed=args.seed, out_dir=args.out,
        force=args.force, train=_train_config(args))
    if args.patterns:
        cfg.patterns = tuple(p.strip() for p in args.patterns.split(";") if p.strip())
    rows = sync_sweep.run(cfg)
    print(sync_sweep.table(rows, markdown=args.markdown))
    print(f"results: {args.out}/results.json, plot: {args.out}/sync_sweep.png")
    return 0


def _sadpt(args: argparse.Namespace) -> int:
    from spd_ext.data import Corruption
    from spd_ext.dp.weights import check_floor
    from spd_ext.experiments import sadpt

    runs = sadpt.default_runs()
    if args.runs:
        wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
        known = {r.name: r for r in runs}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise UsageError(f"unknown run(s) {unknown}; choose from {', '.join(known)}")
        runs = tuple(known[w] for w in wanted)
    most = max(r.nproc for r in runs)
    check_floor(args.floor, most, "--floor", hint=", or fewer ranks with --runs")
    cfg = sadpt.SADPTConfig(
        runs=runs, corruption=Corruption(args.corruption, args.corruption_prob, seed=args.seed),
        signal=args.signal, weighting=args.weighting, temperature=args.temperature,
        floor=args.floor, weight_ema=args.weight_ema, warmup_steps=args.warmup,
        n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
        block_size=args.block_size, corpus=args.data, seed=args.seed, out_dir=args.out,
        force=args.force, train=_train_config(args))
    rows = sadpt.run(cfg)
    print(sadpt.table(rows, markdown=args.markdown))
    print(f"results: {args.out}/results.json, plot: {args.out}/sadpt.png")
    return 0


def _staleness(args: argparse.Namespace) -> int:
    from spd_ext.experiments import staleness

    overrides = {}
    if args.xor_steps is not None:
        overrides["xor"] = {"steps": args.xor_steps}
    if args.gpt_steps is not None:
        overrides["gpt"] = {"steps": args.gpt_steps}
    cfg = staleness.StalenessConfig(
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        stragglers={"both": (False, True), "off": (False,), "on": (True,)}[args.straggler],
        nproc=args.nproc, straggler_factor=args.straggler_factor,
        straggler_every=args.straggler_every, corpus=args.data, seed=args.seed,
        out_dir=args.out, force=args.force, task_overrides=overrides)
    if args.modes:
        cfg.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    for t in cfg.tasks:
        cfg.task(t)
    rows = staleness.run(cfg)
    print(staleness.table(rows, markdown=args.markdown))
    print(f"results: {args.out}/results.json, plot: {args.out}/staleness.png")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", formatter_class=_HelpAsWritten,
        help="serve a reduced-sync GPT over HTTP on N local ranks",
        description="Split a model over N local ranks (tensor parallel N) and serve it: POST "
        "/v1/completions\n(OpenAI's completion format, for OpenAI and vLLM clients; \"stream\": "
        "true for OpenAI's\nserver-sent events), GET /v1/models, POST /tokenize, GET /health, "
        "GET /metrics, and a\nweb page at /. The model and the flags are checked before any "
        "rank starts; SIGINT or\nSIGTERM stops the server after the queued requests (a second "
        "one: at once), a rank that\ndies stops every rank (503 meanwhile).",
        epilog="example:\n  spd-ext serve --hf ./gpt2 --pattern 'spd*12' --nproc 2\n"
        "  curl -N localhost:5050/v1/completions -d '{\"prompt\": \"Hello\", "
        "\"max_tokens\": 32, \"stream\": true}'")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="an spd_ext checkpoint (ckpt.pt of spd-ext "
                        "experiment, or model.pt of spd-ext train)")
    source.add_argument("--hf", help="a local Hugging Face GPT-2 folder (config.json + weights)")
    p.add_argument("--pattern", default=None, help="sync pattern to serve with (default: the "
                   "checkpoint's; tp*L for --hf)")
    p.add_argument("--nproc", type=POSITIVE, default=2, help="ranks = tensor-parallel size")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: "
                   "every interface; the server has no authentication)")
    p.add_argument("--port", type=_bounded(int, 1, high=65535), default=5050,
                   help="TCP port to listen on")
    p.add_argument("--backend", choices=TP_BACKENDS, default=SPD_EXT,
                   help="the tensor-parallel all-reduce: spd_ext.comm or torch.distributed")
    p.add_argument("--max-queue", type=POSITIVE, default=64,
                   help="requests waiting or running before new ones get 503")
    p.add_argument("--fail-grace", type=_bounded(float, 0.0), default=3.0,
                   help="seconds to keep answering 503 after a rank dies (or a second "
                   "SIGINT/SIGTERM), before exiting 1")
    p.add_argument("--rank-timeout", type=_bounded(float, 1.0, high=1e7), default=300.0,
                   help="seconds a rank may stop answering (hung, not dead: a dead one is "
                   "found at once) before the server stops, idle or generating; it also "
                   "bounds how far apart the ranks may finish loading the model")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise UsageError("spd-ext serve needs aiohttp: pip install 'spd_ext[serve]'") from None
    from spd_ext.serve import inspect_source
    from spd_ext.serve.app import run_server

    source = inspect_source(args.checkpoint, args.hf, args.pattern, args.nproc)
    print(f"spd-ext serve: {source.describe()}", flush=True)
    if source.note:
        print(f"spd-ext serve: note: {source.note}", flush=True)
    # the server loads the tokenizer before any rank starts: a missing file is one line
    return run_server(source, args.host, args.port, args.backend, args.max_queue,
                      args.fail_grace, args.rank_timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spd-ext", formatter_class=_Help,
        description="spd_ext: reduced-communication distributed training for PyTorch and "
        "DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_report(sub)
    _add_clean(sub)
    _add_bench(sub)
    _add_tp(sub)
    _add_experiment(sub)
    _add_train(sub)
    _add_serve(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:  # a mistake in what was asked: one line; a defect keeps its traceback
        print(f"spd-ext: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
