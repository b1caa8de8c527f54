"""Plain-text and Markdown tables for benchmark and experiment output."""

from __future__ import annotations

from collections.abc import Sequence

from spd_ext.errors import UsageError


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                 markdown: bool = False) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows)
               for i in range(len(headers))]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    out = [line(cells[0])]
    if markdown:
        out.append("|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                                  for w, num in zip(widths, numeric)) + "|")
    else:
        out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: object) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.4g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def parse_size(text: str) -> int:
    """``4K`` -> 4096, ``64M`` -> 67108864, ``1G``, or plain bytes."""
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    number = t[:-1] if scale != 1 else t
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise UsageError(f"bad size {text!r}; write bytes like 4096, 4K, 16M or 1G") from None
    if value <= 0:
        raise UsageError(f"size must be positive, got {text!r}")
    return value


def parse_sizes(spec: str) -> list[int]:
    """``4K..64M`` (powers of 4 by default, ``4K..64M:2`` for powers of 2) or ``4K,1M``."""
    sizes: list[int] = []
    for part in spec.split(","):
        if ".." in part:
            span, _, step = part.partition(":")
            lo_text, hi_text = span.split("..", 1)
            lo, hi = parse_size(lo_text), parse_size(hi_text)
            factor = int(step) if step else 4
            if factor < 2 or lo > hi:
                raise UsageError(f"bad size range {part!r}: need LO..HI[:FACTOR] with LO <= HI "
                                 "and FACTOR >= 2")
            size = lo
            while size <= hi:
                sizes.append(size)
                size *= factor
        else:
            sizes.append(parse_size(part))
    return sizes


def human_bytes(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B" if n < 1024 else f"{n / 1024:.1f}K"
