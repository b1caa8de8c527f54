"""One declaration per option: the checks and parses derived from an Opt."""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from spd_ext.errors import UsageError
from spd_ext.utils.options import Opt, check, check_fields, closest, option, parse_text


def test_a_value_is_checked_against_its_kind_and_bounds() -> None:
    steps = Opt(10, "int", "steps", low=1)
    assert check("steps", 3, steps) == 3
    for bad, shown in ((0, "got 0"), (True, "got True (bool)"), ("3", "got '3'")):
        with pytest.raises(UsageError, match=re.escape(f"steps must be an integer >= 1, {shown}")):
            check("steps", bad, steps)
    ema = Opt(0.0, "float", "ema", low=0.0, high=1.0, high_open=True)
    assert check("ema", "1e-3", ema) == 0.001  # YAML 1.1 reads 1e-3 as a string
    with pytest.raises(UsageError, match=r"ema must be a number in \[0, 1\), got 1"):
        check("ema", 1, ema)
    kind = Opt("char", "str", "tokenizer", choices=("char", "gpt2"))
    with pytest.raises(UsageError, match="kind is 'gtp2'; did you mean 'gpt2'"):
        check("kind", "gtp2", kind)
    with pytest.raises(UsageError, match="cannot be null"):
        check("steps", None, steps)


def test_text_is_parsed_as_the_kind() -> None:
    assert parse_text("x", "[1, 3]", Opt([], "ints", "")) == [1, 3]
    assert parse_text("x", "off", Opt(True, "bool", "")) is False
    assert parse_text("x", "null", Opt(None, "int", "", nullable=True)) is None
    assert parse_text("x", "a\\nb", Opt("", "str", "")) == "a\nb"
    with pytest.raises(UsageError, match="x must be an integer, got 'ten'"):
        parse_text("x", "ten", Opt(1, "int", ""))
    assert closest("temprature", ["temperature", "floor"]) == "temperature"


@dataclass
class _Section:
    rate: float = option(1.0, "a rate", low=0.0, low_open=True)
    count: int | None = option(None, "a count", low=1)


def test_dataclass_fields_are_checked_and_coerced() -> None:
    section = _Section(rate=2)
    check_fields(section, "s")
    assert isinstance(section.rate, float) and section.count is None
    with pytest.raises(UsageError, match="s.count must be an integer >= 1 or null, got 0"):
        check_fields(_Section(count=0), "s")
