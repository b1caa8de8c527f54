"""Command-line flags derived from option declarations (:func:`spd_ext.utils.options.option`).

A configuration dataclass declares each option once; :func:`add_options` turns the
declarations into argparse flags (name, kind, bounds, choices, default, help) and
:func:`config_from` builds the configuration back from the parsed flags. A bad value is one
usage line before anything runs, worded as a bad value in a config file is.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from spd_ext.errors import UsageError
from spd_ext.utils.options import Opt, describe, flag_of, options_of, parse_text

__all__ = ["Help", "HelpAsWritten", "add_option", "add_options", "add_table_args", "config_from",
           "value_type", "write_json_output"]


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every --help shows the defaults, once: a help that says its default in words
    (a default of None meaning "the checkpoint's", "all", ...) gets no "(default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and ("(default:" in action.help or action.default is None or
                            isinstance(action, (argparse._StoreTrueAction,
                                                argparse._StoreFalseAction))):
            return action.help  # an on / off flag says its default in words
        return super()._get_help_string(action)


class HelpAsWritten(Help, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, description and epilog as written (config keys one per line,
    example commands on lines of their own)."""


def value_type(flag: str, opt: Opt):  # noqa: ANN202 - an argparse type
    """An argparse ``type`` that parses and checks the text as the option's kind."""

    def parse(text: str) -> Any:
        try:
            return parse_text(flag, text, opt)
        except UsageError as exc:  # argparse prefixes "argument FLAG: "
            message = str(exc).removeprefix(f"{flag} ")
            if message.startswith("must be "):  # the text as given, not as parsed
                message = f"must be {describe(opt)}, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None

    parse.__name__ = opt.kind
    return parse


_OWN = object()  # add_option's default: the option's own


def add_options(parser: argparse.ArgumentParser | argparse._ActionsContainer, defaults: Any,
                only: Iterable[str] | None = None, skip: Iterable[str] = (),
                prefix: str = "") -> None:
    """A flag for each option field of the dataclass instance ``defaults`` (those named in
    ``only``, else all but ``skip``), its value there the default. ``prefix``: where the
    instance lies in the configuration the flags build (``"train."``)."""
    cls = type(defaults)
    declared = options_of(cls)
    names = [n for n in (declared if only is None else only) if n not in set(skip)]
    for name in names:
        add_option(parser, flag_of(cls, name), declared[name], dest=prefix + name,
                   default=getattr(defaults, name))


def add_option(parser: argparse.ArgumentParser | argparse._ActionsContainer, flag: str,
               opt: Opt, dest: str | None = None, default: Any = _OWN) -> None:
    """The flag of one option (``default``: the option's own unless given)."""
    default = opt.default if default is _OWN else default
    dest = dest or flag[2:].replace("-", "_")
    if opt.kind == "bool" and default:
        parser.add_argument("--no-" + flag[2:], dest=dest, action="store_false",
                            help=f"{opt.help}: on unless this flag is given")
    elif opt.kind == "bool":
        parser.add_argument(flag, dest=dest, action="store_true", help=opt.help)
    else:
        parser.add_argument(flag, dest=dest, type=value_type(flag, opt), default=default,
                            metavar="{" + ",".join(opt.choices) + "}" if opt.choices
                            else flag[2:].replace("-", "_").upper(), help=opt.help)


def config_from(args: argparse.Namespace, defaults: Any, prefix: str = "", **extra: Any) -> Any:
    """``defaults`` (a dataclass instance) with the values of the flags :func:`add_options`
    made for it, nested configurations included, and ``extra``."""
    changes = dict(extra)
    declared = options_of(type(defaults))
    for f in dataclasses.fields(defaults):
        dest, value = prefix + f.name, getattr(defaults, f.name)
        if f.name in changes:
            continue
        if f.name in declared and hasattr(args, dest):
            changes[f.name] = getattr(args, dest)
        elif dataclasses.is_dataclass(value):
            changes[f.name] = config_from(args, value, prefix=f"{dest}.")
    return dataclasses.replace(defaults, **changes)


def add_table_args(p: argparse.ArgumentParser) -> None:
    """The output options every benchmark shares."""
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--json", metavar="PATH", help="also write the raw timings as JSON")


def write_json_output(path: str | None, payload: object) -> None:
    """``--json PATH``: the raw rows, written atomically."""
    if path:
        from spd_ext.utils.files import write_json

        write_json(Path(path), payload)
