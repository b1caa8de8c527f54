"""`spd-ext experiment ...`: the sync sweep, signal-aware data parallelism and staleness
experiments. Their flags derive from their configurations (spd_ext.experiments.config); the
experiments (and torch) load only when one runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from spd_ext.cli.flags import Help, add_options, config_from, value_type
from spd_ext.experiments.config import (
    SADPTConfig,
    StalenessConfig,
    SyncSweepConfig,
    default_runs,
)
from spd_ext.tp.config import GPTConfig
from spd_ext.train.trainer_config import TrainConfig
from spd_ext.utils.options import options_of

#: the training options an experiment's flags set (the schedule follows from them)
_TRAIN_FLAGS = ("max_steps", "batch_size", "lr", "eval_interval", "eval_batches")
_SHAPE_FLAGS = ("n_layer", "n_head", "n_embd", "block_size")
_RUN_FLAGS = ("corpus", "seed", "out_dir", "force")


def add_parser(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, formatter_class=Help, help=help)
    ex = p.add_subparsers(dest="experiment", required=True,
                          metavar="{sync-sweep,sadpt,staleness,faults}")
    _add_sync_sweep(ex)
    _add_sadpt(ex)
    _add_staleness(ex)
    _add_faults(ex)


def _add_sync_sweep(ex: argparse._SubParsersAction) -> None:
    sweep = SyncSweepConfig()
    s = ex.add_parser(
        "sync-sweep", formatter_class=Help, help="val loss vs tensor-parallel sync count",
        description="Train a small char-level GPT on TinyShakespeare for every sync pattern "
        "(emulated tensor parallelism, same seed, data and steps); print val loss against the "
        "measured sync count and plot it. Finished patterns are kept in OUT/results.json and "
        "skipped on a rerun.")
    s.add_argument("--patterns", default=None, help="';'-separated patterns (default: the "
                   "ten GPT-2 124M patterns of configs/tp)")
    add_options(s, sweep.model, only=(*_SHAPE_FLAGS, "tp_size"), prefix="model.")
    _add_run_flags(s, sweep)
    s.set_defaults(func=sync_sweep)


def _add_sadpt(ex: argparse._SubParsersAction) -> None:
    dp = SADPTConfig()
    names = ", ".join(r.name for r in default_runs())
    a = ex.add_parser(
        "sadpt", formatter_class=Help, help="signal-aware DP on clean and corrupted shards",
        description="The signal-aware data-parallel table: 2 ranks IID / non-IID (one rank's "
        "data corrupted) with uniform or signal-weighted aggregation, then 4 ranks with one "
        "corrupt rank against the robust baselines. Clean validation loss, time, final "
        "weights; a plot of weights and loss curves. Finished runs are kept in "
        "OUT/results.json.")
    a.add_argument("--runs", default=None, help=f"comma list of run names (default: all: "
                   f"{names})")
    add_options(a, dp, only=("corruption", "corruption_prob", "signal", "weighting",
                             "temperature", "floor", "weight_ema", "warmup_steps"))
    add_options(a, dp.model, only=_SHAPE_FLAGS, prefix="model.")
    _add_run_flags(a, dp)
    a.set_defaults(func=sadpt)


def _add_staleness(ex: argparse._SubParsersAction) -> None:
    st = ex.add_parser(
        "staleness", formatter_class=Help,
        help="sync vs async vs local modes under a straggler",
        description="Train the XOR logistic regression and a small char GPT with every "
        "staleness mode on N CPU ranks, with and without a straggler (the first worker F "
        "times slower every E steps): final loss, steps and seconds to a target loss, "
        "staleness, idle time, messages per step; a plot of loss against wall-clock. "
        "Finished runs are kept in OUT/results.json.")
    stale = StalenessConfig()
    st.add_argument("--modes", default=None, help="comma list (default: "
                    f"{', '.join(stale.modes)})")
    st.add_argument("--tasks", default=",".join(stale.tasks), help="comma list of xor, gpt")
    st.add_argument("--straggler", default="both", choices=["both", "off", "on"],
                    help="run without, with, or both")
    add_options(st, stale, only=("nproc", "straggler_factor", "straggler_every"))
    for task in ("xor", "gpt"):
        st.add_argument(f"--{task}-steps", default=None,
                        type=value_type(f"--{task}-steps", options_of(TrainConfig)["max_steps"]),
                        help=f"{task} training steps (default {stale.task(task).steps})")
    add_options(st, stale, only=_RUN_FLAGS)
    st.add_argument("--markdown", action="store_true", help="print a Markdown table")
    st.set_defaults(func=staleness)


def _add_faults(ex: argparse._SubParsersAction) -> None:
    from spd_ext.experiments.faults import ARMS, FaultsConfig

    d = FaultsConfig()
    f = ex.add_parser(
        "faults", formatter_class=Help, help="fault-tolerant islands vs restart-everything",
        description="A small char GPT on TinyShakespeare as K fault-tolerant DiLoCo islands "
        "(torchft), each a whole `spd-ext train` run: no failure; one island killed every T "
        "seconds (restarted, healed from a live one); the islands in one job killed whole "
        "every T seconds and resumed from the last checkpoint (the torchelastic behaviour). "
        "Wall time, throughput, final validation loss, survivors' longest pause; a plot of "
        "validation loss against wall-clock. Finished arms are kept in OUT/results.json.")
    f.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    f.add_argument("--islands", type=int, default=d.islands, help="DiLoCo islands")
    f.add_argument("--ranks-per-island", type=int, default=d.ranks_per_island,
                   help="ranks of each island (ZeRO-1 inside)")
    f.add_argument("--steps", type=int, default=d.steps, help="training steps")
    f.add_argument("--H", type=int, default=d.H, help="inner steps between outer steps")
    f.add_argument("--kill-every", type=float, default=d.kill_every_s,
                   help="seconds between failures")
    f.add_argument("--checkpoint-interval", type=int, default=d.checkpoint_interval,
                   help="steps between checkpoints (what the restart-everything arm resumes)")
    f.add_argument("--eval-interval", type=int, default=d.eval_interval,
                   help="steps between validation losses")
    f.add_argument("--out", type=Path, default=d.out_dir, help="output folder")
    f.add_argument("--force", action="store_true", help="rerun finished arms")
    f.add_argument("--markdown", action="store_true", help="print a Markdown table")
    f.set_defaults(func=faults)


def _add_run_flags(p: argparse.ArgumentParser, defaults: SADPTConfig | SyncSweepConfig) -> None:
    """The training, output and data flags the training experiments share."""
    add_options(p, defaults.train, only=_TRAIN_FLAGS, prefix="train.")
    add_options(p, defaults, only=_RUN_FLAGS)
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")


def _model_from(args: argparse.Namespace, defaults: GPTConfig) -> GPTConfig:
    """The flags' shape, dense (a sweep sets each run's pattern itself)."""
    return config_from(args, defaults, prefix="model.",
                       pattern=f"tp*{getattr(args, 'model.n_layer')}")


def _train_from(args: argparse.Namespace, defaults: TrainConfig) -> TrainConfig:
    """The flags' steps and peak rate with the schedule the experiments use: cosine to lr/10,
    warm-up a tenth of the steps (at most 50), a log line as often."""
    steps, lr = getattr(args, "train.max_steps"), getattr(args, "train.lr")
    return config_from(args, defaults, prefix="train.", min_lr=lr / 10,
                       warmup_steps=min(50, steps // 10), log_interval=max(1, min(50, steps // 10)))


def sync_sweep(args: argparse.Namespace) -> int:
    from spd_ext.experiments import sync_sweep

    defaults = SyncSweepConfig()
    cfg = config_from(args, defaults, model=_model_from(args, defaults.model),
                      train=_train_from(args, defaults.train))
    if args.patterns:
        cfg.patterns = tuple(p.strip() for p in args.patterns.split(";") if p.strip())
    rows = sync_sweep.run(cfg)
    print(sync_sweep.table(rows, markdown=args.markdown))
    print(f"results: {cfg.out_dir}/results.json, plot: {cfg.out_dir}/sync_sweep.png")
    return 0


def sadpt(args: argparse.Namespace) -> int:
    from spd_ext.experiments import sadpt

    defaults = SADPTConfig()
    cfg = config_from(args, defaults, model=_model_from(args, defaults.model),
                      train=_train_from(args, defaults.train))
    if args.runs:
        cfg.select_runs(args.runs)
    cfg.check()
    rows = sadpt.run(cfg)
    print(sadpt.table(rows, markdown=args.markdown))
    print(f"results: {cfg.out_dir}/results.json, plot: {cfg.out_dir}/sadpt.png")
    return 0


def staleness(args: argparse.Namespace) -> int:
    from spd_ext.experiments import staleness

    overrides = {task: {"steps": steps} for task, steps in
                 (("xor", args.xor_steps), ("gpt", args.gpt_steps)) if steps is not None}
    cfg = config_from(
        args, StalenessConfig(),
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        stragglers={"both": (False, True), "off": (False,), "on": (True,)}[args.straggler],
        task_overrides=overrides)
    if args.modes:
        cfg.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    for t in cfg.tasks:
        cfg.task(t)
    rows = staleness.run(cfg)
    print(staleness.table(rows, markdown=args.markdown))
    print(f"results: {cfg.out_dir}/results.json, plot: {cfg.out_dir}/staleness.png")
    return 0


def faults(args: argparse.Namespace) -> int:
    from spd_ext.experiments import faults
    from spd_ext.experiments.faults import FaultsConfig

    cfg = FaultsConfig(islands=args.islands, ranks_per_island=args.ranks_per_island,
                       steps=args.steps, H=args.H, kill_every_s=args.kill_every,
                       checkpoint_interval=args.checkpoint_interval,
                       eval_interval=args.eval_interval, out_dir=args.out,
                       arms=tuple(a.strip() for a in args.arms.split(",") if a.strip()),
                       force=args.force)
    rows = faults.run(cfg)
    print(faults.table(rows, markdown=args.markdown))
    print(f"results: {cfg.out_dir}/results.json, plot: {cfg.out_dir}/faults.png")
    return 0
