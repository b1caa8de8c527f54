"""`spd-ext train`: train a GPT from a YAML/JSON run config (the flags a launched rank also
takes come from spd_ext.train.run; the config keys from spd_ext.train.config)."""

from __future__ import annotations

import argparse
import json

from spd_ext.cli.flags import HelpAsWritten, add_option
from spd_ext.errors import UsageError
from spd_ext.utils.options import Opt

_DESCRIPTION = (
    "Train a reduced-sync GPT through spd_ext.deepspeed from one YAML or JSON "
    "file (sections model, data, training, parallel, deepspeed, sample, wandb).\nThe "
    "config is checked before any rank starts; a mistake is one line naming the key and "
    "the fix.\n\n  spd-ext train configs/train/quickstart.yaml\n  spd-ext train "
    "configs/train/quickstart.yaml --nproc 2 --set parallel.tp=2 --set "
    "model.pattern='spd*2' --set training.out_dir=out/quickstart-tp2\n  deepspeed "
    "--num_gpus 8 --module spd_ext.train.run CONFIG   (or "
    "torchrun ... -m spd_ext.train.run CONFIG)\n\nRank 0 prints progress and writes "
    "OUT_DIR/log.jsonl, loss.png, sample.txt, summary.json, model.pt (for spd-ext serve) "
    "and checkpoints/.")


def add_parser(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    from spd_ext.train.config import options_help
    from spd_ext.train.run import add_arguments

    p = sub.add_parser(name, formatter_class=HelpAsWritten, help=help,
                       description=_DESCRIPTION,
                       epilog="config keys (section.key = default):\n" + options_help())
    add_arguments(p)
    add_option(p, "--nproc", Opt(None, "int", "start N local ranks under the deepspeed "
                                 "launcher (default: 1 rank in this process, or the ranks of "
                                 "the launcher this runs under)", nullable=True, low=1))
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, print it resolved and the ds_config, train nothing")
    p.set_defaults(func=train)


def train(args: argparse.Namespace) -> int:
    from spd_ext.train import run as train_run
    from spd_ext.train.config import describe

    launched = train_run.launched_world_size()
    if args.nproc is not None and launched is not None:
        raise UsageError(f"--nproc {args.nproc} starts a launcher, but this process already "
                         f"runs under one (WORLD_SIZE={launched}); drop --nproc")
    world = args.nproc or launched or 1
    if args.rejoin and args.nproc is not None:
        args.overwrite = True  # a restarted island keeps its out_dir (no refusal, no wipe)
    plan, facts = train_run.prepare(args.config, args.overrides, world, args.resume,
                                    args.overwrite, hold=not args.dry_run,
                                    dry_run=args.dry_run)
    if args.dry_run:
        print(describe(plan.cfg).rstrip())
        print(f"# {world} rank(s): tp {plan.tp}, pp {plan.pp}, islands {plan.islands}, data "
              f"parallel {plan.data_world}; corpus vocabulary {facts['vocab_size']}; out_dir "
              f"{plan.out_dir}" + (f"; resume from {facts['resume_tag']}"
                                   if "resume_tag" in facts else ""))
        print("# ds_config: " + json.dumps(plan.ds_config))
        if "checkpoints_note" in facts:
            print(f"# note: {facts['checkpoints_note']}")
        return 0
    if plan.fault_tolerant and plan.island is None:
        return _train_islands(args, plan)
    if args.nproc is not None:  # the launched rank 0 says the resume note, as it does alone
        return train_run.launch(args.config, args.overrides, args.nproc, args.resume,
                                args.overwrite, rejoin=args.rejoin)
    train_run.single_process_environment()
    return train_run.run(plan, facts, resume=args.resume, rejoin=args.rejoin)


def _train_islands(args: argparse.Namespace, plan) -> int:
    """fault_tolerance.enabled without fault_tolerance.island: this process runs every
    island on this host (spd_ext.train.islands)."""
    from spd_ext.train.islands import IslandSupervisor

    if args.nproc is None:
        raise UsageError("fault_tolerance.enabled: spd-ext train starts the island jobs itself; "
                         "pass --nproc N (parallel.islands x ranks per island), or run one "
                         "island per machine with --set fault_tolerance.island=K")
    if args.resume or args.rejoin:
        raise UsageError(f"{'--resume' if args.resume else '--rejoin'} with fault_tolerance "
                         "on one host: not supported yet (an island that dies is restarted and "
                         "heals from the live ones); start the run again with --overwrite")
    supervisor = IslandSupervisor(plan, args.config, args.overrides, args.nproc)
    supervisor.check_out_dirs(args.overwrite)
    return supervisor.run()
