"""The command line: flags derived from option declarations, and a parser that loads only
the command it runs (no torch for --help or a mistyped flag)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from spd_ext.cli import COMMANDS, build_parser
from spd_ext.cli.flags import add_options, config_from
from spd_ext.utils.options import option


@dataclass
class _Inner:
    steps: int = option(10, "steps to run", low=1, flag="--n-steps")
    rate: float = option(0.5, "a rate", low=0.0, high=1.0)


@dataclass
class _Outer:
    name: str = option("a", "a name", choices=("a", "b"))
    pinned: bool = option(True, "pin the ranks")
    verbose: bool = option(False, "say more")
    limit: int | None = option(None, "a limit (default: none)", low=1)
    plain: str = "not a flag"
    inner: _Inner = field(default_factory=_Inner)


def _parser(defaults: _Outer) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t")
    add_options(p, defaults)
    add_options(p, defaults.inner, prefix="inner.")
    return p


def test_flags_derive_from_the_declarations_and_build_the_config_back() -> None:
    defaults = _Outer(inner=_Inner(steps=20))
    p = _parser(defaults)
    assert config_from(p.parse_args([]), defaults) == defaults  # the instance's defaults
    args = p.parse_args(["--name", "b", "--no-pinned", "--verbose", "--limit", "3",
                         "--n-steps", "7", "--rate", "1"])
    cfg = config_from(args, defaults)
    assert cfg == _Outer(name="b", pinned=False, verbose=True, limit=3,
                         inner=_Inner(steps=7, rate=1.0))
    assert isinstance(cfg.inner.rate, float) and cfg.plain == "not a flag"
    assert config_from(args, defaults, limit=9).limit == 9  # an explicit value wins


@pytest.mark.parametrize("argv, message", [
    (["--n-steps", "0"], "argument --n-steps: must be an integer >= 1, got '0'"),
    (["--rate", "1.5"], "argument --rate: must be a number in [0, 1], got '1.5'"),
    (["--rate", "nan"], "argument --rate: must be a number in [0, 1], got 'nan'"),
    (["--limit", "x"], "argument --limit: must be an integer >= 1 or null, got 'x'"),
    (["--name", "bb"], "argument --name: is 'bb'; did you mean 'b'? (choose one of a, b)"),
])
def test_a_bad_flag_is_one_usage_line_worded_by_its_declaration(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        _parser(_Outer()).parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_building_the_parser_for_help_or_a_bad_flag_loads_no_torch() -> None:
    """`spd-ext --help` builds one-line stubs; `spd-ext bench tp --help` and a refused flag
    build their own command only, from torch-free declarations."""
    script = ("import sys\nfrom spd_ext.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "heavy = sorted(m for m in ('torch', 'numpy', 'deepspeed', 'aiohttp') "
              "if m in sys.modules)\nprint('loaded:', heavy, file=sys.stderr)\n")
    for argv in ([], ["--help"], *([name, "--help"] for name in COMMANDS),
                 ["bench", "tp", "--help"], ["experiment", "sadpt", "--help"],
                 ["tp", "syncs", "--help"], ["bench", "allreduce", "--nproc", "0"],
                 ["serve", "--port", "0"]):
        proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                              text=True, timeout=60)
        assert "loaded: []" in proc.stderr, (argv, proc.stderr[-2000:])


def test_only_the_named_command_is_built() -> None:
    parser = build_parser(["bench", "--help"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sub.choices["bench"]._subparsers is not None  # built in full
    assert sub.choices["train"]._actions[-1].dest == "help"  # a stub: its help flag only
