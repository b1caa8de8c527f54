"""Staleness modes by name: ``ssgd``, ``delayed:k``, ``local_sgd:H``, ``diloco:H``,
``ssp:s``, ``asgd``, ``syncps``."""

from __future__ import annotations

from dataclasses import dataclass

from spd_ext.errors import UsageError

MODES = {  # name -> (parameter name or None, needs a parameter server)
    "ssgd": (None, False),
    "delayed": ("k", False),
    "local_sgd": ("H", False),
    "diloco": ("H", False),
    "ssp": ("s", True),
    "asgd": (None, True),
    "syncps": (None, True),
}


@dataclass(frozen=True)
class Mode:
    kind: str
    value: int = 0

    @property
    def server(self) -> bool:
        return MODES[self.kind][1]

    def __str__(self) -> str:
        return self.kind if MODES[self.kind][0] is None else f"{self.kind}:{self.value}"


def parse_mode(text: str) -> Mode:
    """``delayed:2`` -> Mode("delayed", 2); errors name the mode and the valid forms."""
    kind, _, arg = text.strip().partition(":")
    forms = ", ".join(k if p is None else f"{k}:{p}" for k, (p, _) in MODES.items())
    if kind not in MODES:
        raise UsageError(f"unknown staleness mode {text!r}; use one of {forms}")
    param = MODES[kind][0]
    if param is None:
        if arg:
            raise UsageError(f"mode {kind} takes no parameter, got {text!r}")
        return Mode(kind)
    try:
        value = int(arg)
    except ValueError:
        raise UsageError(f"mode {kind} needs an integer {param}, as in {kind}:2; got "
                         f"{text!r}") from None
    if value < 0 or (kind in ("local_sgd", "diloco") and value < 1):
        low = 1 if kind in ("local_sgd", "diloco") else 0
        raise UsageError(f"{kind}:{param} must be >= {low}, got {value}")
    return Mode(kind, value)
