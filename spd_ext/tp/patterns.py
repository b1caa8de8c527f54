"""Block patterns: ``tp*12``, ``[tp,spd]*6``, ``tp*6,spd*6``, ``grouped:4``.

Grammar: ``pattern := item ("," item)*``, ``item := (NAME | "[" pattern "]") ("*" N)?``;
``grouped:K`` alone means ``[parallel]*(K-1)`` followed by ``spd``, repeated to n_layer
(K layers share one sync).
"""

from __future__ import annotations

import re

from spd_ext.errors import UsageError

BLOCK_KINDS = ("tp", "spd", "parallel", "palm", "ladder")
_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z_0-9]*)|(\d+)|(.))")


class PatternError(UsageError):
    """A pattern string that does not parse or does not fit the model."""


def _tokens(pattern: str) -> list[tuple[str, str, int]]:
    """(kind, text, position) for every name, number and symbol."""
    out = []
    for m in _TOKEN.finditer(pattern):
        for group, kind in ((1, "name"), (2, "number"), (3, "symbol")):
            if m.group(group) is not None:
                out.append((kind, m.group(group), m.start(group)))
    return out


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.tokens = _tokens(pattern)
        self.i = 0

    def fail(self, message: str) -> PatternError:
        pos = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.pattern)
        return PatternError(f"{message} at position {pos} in pattern {self.pattern!r}; valid "
                            f"blocks: {', '.join(BLOCK_KINDS)}; forms: tp*12, [tp,spd]*6, "
                            "tp*6,spd*6, grouped:4")

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, text: str) -> bool:
        tok = self.peek()
        if tok is not None and tok[1] == text:
            self.i += 1
            return True
        return False

    def sequence(self) -> list[str]:
        blocks = self.item()
        while self.take(","):
            blocks += self.item()
        return blocks

    def item(self) -> list[str]:
        tok = self.peek()
        if tok is None:
            raise self.fail("pattern ends where a block was expected")
        if self.take("["):
            body = self.sequence()
            if not self.take("]"):
                raise self.fail("missing ']'")
        elif tok[0] == "name":
            if tok[1] not in BLOCK_KINDS:
                raise self.fail(f"unknown block {tok[1]!r}")
            self.i += 1
            body = [tok[1]]
        else:
            raise self.fail(f"unexpected {tok[1]!r}")
        if self.take("*"):
            count = self.peek()
            if count is None or count[0] != "number" or int(count[1]) < 1:
                raise self.fail("'*' must be followed by a positive count")
            self.i += 1
            body = body * int(count[1])
        return body


def parse_pattern(pattern: str, n_layer: int | None = None) -> list[str]:
    """The block kinds of ``pattern``, one per layer; checks the length against n_layer."""
    text = pattern.strip()
    if text.startswith("grouped:"):
        size = text.split(":", 1)[1]
        if not size.isdigit() or int(size) < 1:
            raise PatternError(f"grouped:K needs a positive integer K, got {pattern!r}")
        k = int(size)
        if n_layer is None:
            raise PatternError("grouped:K needs n_layer to know how many groups to build")
        if n_layer % k != 0:
            raise PatternError(f"grouped:{k} needs n_layer divisible by {k}, got {n_layer}")
        blocks = (["parallel"] * (k - 1) + ["spd"]) * (n_layer // k)
    else:
        parser = _Parser(text)
        blocks = parser.sequence()
        if parser.peek() is not None:
            raise parser.fail(f"unexpected {parser.peek()[1]!r}")
    if n_layer is not None and len(blocks) != n_layer:
        raise PatternError(f"pattern {pattern!r} gives {len(blocks)} blocks but the model has "
                           f"n_layer={n_layer}")
    return blocks
