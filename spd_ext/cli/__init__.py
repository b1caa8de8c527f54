"""`spd-ext` command line: environment report, benchmarks, experiments, training, serving.

One module per command group (spd_ext.cli.bench, .tp, .experiment, .train, .serve,
.maintenance); each adds its parser with :func:`add_parser`. Only the group a command line
names is built (its flags derive from torch-free option declarations), so ``spd-ext --help``
and a mistyped flag answer without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from spd_ext.cli.flags import Help
from spd_ext.errors import UsageError

#: command -> (the module that builds its parser and runs it, its one-line help)
COMMANDS = {
    "report": ("spd_ext.cli.maintenance", "each op: compatible, built, implementation in use"),
    "clean": ("spd_ext.cli.maintenance", "remove shared-memory segments and build locks left "
              "by dead jobs"),
    "bench": ("spd_ext.cli.bench", "kernel and collective microbenchmarks"),
    "tp": ("spd_ext.cli.tp", "tensor-parallel sync patterns: counts, sensitivity"),
    "experiment": ("spd_ext.cli.experiment", "experiments that print tables and write plots"),
    "train": ("spd_ext.cli.train", "train a GPT from a YAML/JSON run config"),
    "serve": ("spd_ext.cli.serve", "serve a reduced-sync GPT over HTTP on N local ranks"),
}


def _named_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (its first word that is not an option), if any."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the command it names is built in full (the others
    keep their one-line help), so that nothing else is imported."""
    parser = argparse.ArgumentParser(
        prog="spd-ext", formatter_class=Help,
        description="spd_ext: reduced-communication distributed training for PyTorch and "
        "DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    named = None if argv is None else _named_command(argv)
    for name, (module, help) in COMMANDS.items():
        if argv is None or name == named:
            importlib.import_module(module).add_parser(sub, name, help)
        else:
            sub.add_parser(name, help=help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:  # a mistake in what was asked: one line; a defect keeps its traceback
        print(f"spd-ext: error: {exc}", file=sys.stderr)
        return 2
