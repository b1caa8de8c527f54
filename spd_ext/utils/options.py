"""One way to declare an option: its default, kind, bounds and help (:class:`Opt`).

Everything a user can set is declared once as an :class:`Opt` (in a mapping, as the run
config's sections are, or as a dataclass field made with :func:`option`, as the commands'
configurations are) and everything else is derived from that one declaration: the check
of a value read from a file (:func:`check`), the parse of a value given as text on the
command line or with ``--set`` (:func:`parse_text`), the "did you mean" of a misspelt
name (:func:`closest`), and the defaults. Torch-free, so that what reads options need not
load torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from spd_ext.errors import UsageError

__all__ = ["Opt", "check", "check_fields", "closest", "describe", "flag_of", "opt_from",
           "option", "option_from", "options_of", "parse_text"]

#: "object": a mapping (or what its owner accepts in its place) the owner checks itself
KINDS = ("int", "float", "bool", "str", "ints", "object")


@dataclass(frozen=True)
class Opt:
    """One option. ``kind``: int, float, bool, str or ints (a list of integers); numbers
    lie within ``low`` / ``high`` (inclusive, or exclusive where ``*_open``)."""

    default: Any
    kind: str
    help: str
    nullable: bool = False
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Opt kind {self.kind!r} is not one of {KINDS}")


def describe(opt: Opt) -> str:
    """What a value of ``opt`` must be, in words: "an integer >= 1", "a number in [0, 1)"."""
    text = {"int": "an integer", "float": "a number", "bool": "true or false",
            "str": "a string", "ints": "a list of integers", "object": "a mapping"}[opt.kind]
    if opt.kind in ("int", "float"):
        if opt.low is not None and opt.high is not None:
            text += (f" in {'(' if opt.low_open else '['}{opt.low:g}, {opt.high:g}"
                     f"{')' if opt.high_open else ']'}")
        elif opt.low is not None:
            text += f" {'>' if opt.low_open else '>='} {opt.low:g}"
        elif opt.high is not None:
            text += f" {'<' if opt.high_open else '<='} {opt.high:g}"
    return text + (" or null" if opt.nullable else "")


def closest(word: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The candidate ``word`` was probably meant to be (for "did you mean"), or None."""
    match = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=cutoff)
    return match[0] if match else None


def check(name: str, value: Any, opt: Opt, error: type[UsageError] = UsageError) -> Any:
    """``value`` as the option's kind (an int stays an int; a string such as '1e-3' where a
    number is due, as YAML 1.1 reads it, becomes the number), or ``error`` naming the
    option, what it must be and what it got."""
    if value is None:
        if opt.nullable:
            return None
        raise error(f"{name} cannot be null; it must be {describe(opt)} (default "
                    f"{opt.default!r})")
    bad = error(f"{name} must be {describe(opt)}, got {value!r}"
                + ("" if isinstance(value, (int, float, str)) and not isinstance(value, bool)
                   else f" ({type(value).__name__})"))
    kind = opt.kind
    if kind == "object":
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            raise bad
        value = float(value)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad
    elif kind == "str":
        if not isinstance(value, str):
            raise bad
    elif not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int)
                                            for v in value):
        raise bad
    if opt.choices is not None and value not in opt.choices:
        match = closest(value, opt.choices, cutoff=0.0 if len(opt.choices) < 3 else 0.6)
        hint = f"; did you mean {match!r}?" if match else ""
        raise error(f"{name} is {value!r}{hint} (choose one of {', '.join(opt.choices)})")
    if kind in ("int", "float"):
        below = opt.low is not None and (value <= opt.low if opt.low_open else value < opt.low)
        above = opt.high is not None and (value >= opt.high if opt.high_open
                                          else value > opt.high)
        if below or above:
            raise bad
    return value


_NULL = ("null", "none", "~")
_BOOL = {"true": True, "yes": True, "on": True, "1": True,
         "false": False, "no": False, "off": False, "0": False}


def parse_text(name: str, text: str, opt: Opt, error: type[UsageError] = UsageError) -> Any:
    """A value given as text (a flag, ``--set key=value``), parsed and checked."""
    stripped = text.strip()
    if stripped.lower() in _NULL and (opt.kind != "str" or opt.nullable):
        return check(name, None, opt, error)
    if opt.kind == "str":
        return check(name, text.replace("\\n", "\n").replace("\\t", "\t"), opt, error)
    bad = error(f"{name} must be {describe(opt)}, got {text!r}")
    try:
        if opt.kind == "int":
            value: Any = int(stripped)
        elif opt.kind == "float":
            value = float(stripped)
        elif opt.kind == "bool":
            if stripped.lower() not in _BOOL:
                raise bad
            value = _BOOL[stripped.lower()]
        else:  # ints: [1, 2], 1,2 or a single number
            body = stripped.strip("[]").strip()
            value = [int(v) for v in body.split(",") if v.strip()] if body else []
    except ValueError:
        raise bad from None
    return check(name, value, opt, error)


# -- options as dataclass fields ----------------------------------------------------------
def option(default: Any, help: str, *, choices: Sequence[str] | None = None,
           low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, flag: str | None = None) -> Any:
    """A dataclass field declared as an option: the kind comes from the annotation
    (``int``, ``float``, ``bool``, ``str``, ``list[int]``; ``| None``: nullable). ``flag``:
    its command-line flag where that is not ``--`` and the name with dashes (a flag that
    kept its older spelling)."""
    meta = {"help": help, "choices": None if choices is None else tuple(choices),
            "low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "flag": flag}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default),
                                 metadata={"option": meta})
    return dataclasses.field(default=default, metadata={"option": meta})


def opt_from(cls: type, name: str, default: Any = dataclasses.MISSING, *,
             help: str | None = None) -> Opt:
    """The :class:`Opt` of ``cls.name`` (its kind, help, bounds and choices), with another
    default (or help): the same option in a mapping schema, described once."""
    opt = options_of(cls)[name]
    return dataclasses.replace(opt, default=opt.default if default is dataclasses.MISSING
                               else default, help=help or opt.help)


def option_from(cls: type, name: str, default: Any = dataclasses.MISSING, *,
                help: str | None = None) -> Any:
    """A field declared as ``cls.name`` is (its help, bounds and choices), with another
    default (or help): the same option in another configuration, described once."""
    source = next(f for f in dataclasses.fields(cls) if f.name == name).metadata["option"]
    opt = opt_from(cls, name, default, help=help)
    return option(opt.default, opt.help, choices=opt.choices, low=opt.low, high=opt.high,
                  low_open=opt.low_open, high_open=opt.high_open, flag=source["flag"])


def flag_of(cls: type, name: str) -> str:
    """The command-line flag of option ``name`` of ``cls``."""
    meta = next(f for f in dataclasses.fields(cls) if f.name == name).metadata["option"]
    return meta["flag"] or "--" + name.replace("_", "-")


_ANNOTATION_KINDS = {"int": "int", "float": "float", "bool": "bool", "str": "str",
                     "list[int]": "ints"}


def options_of(cls: type) -> dict[str, Opt]:
    """The options a dataclass declares with :func:`option`, by field name."""
    found = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("option")
        if meta is None:
            continue
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        parts = [p.strip() for p in annotation.split("|")]
        nullable = "None" in parts
        kinds = [_ANNOTATION_KINDS[p] for p in parts if p in _ANNOTATION_KINDS]
        if len(kinds) != 1:
            raise TypeError(f"{cls.__name__}.{f.name}: an option is one of "
                            f"{', '.join(_ANNOTATION_KINDS)} (or None), not {annotation!r}")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        found[f.name] = Opt(default, kinds[0], meta["help"], nullable=nullable,
                            choices=meta["choices"], low=meta["low"], high=meta["high"],
                            low_open=meta["low_open"], high_open=meta["high_open"])
    return found


def check_fields(obj: Any, where: str = "", error: type[UsageError] = UsageError) -> None:
    """Every option field of the dataclass instance ``obj`` checked (and coerced: an int
    where a number is due becomes a float) in place; ``where`` prefixes the names."""
    for name, opt in options_of(type(obj)).items():
        label = f"{where}.{name}" if where else name
        # object.__setattr__: frozen dataclasses are checked the same way
        object.__setattr__(obj, name, check(label, getattr(obj, name), opt, error))
