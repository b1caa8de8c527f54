"""The codes Python passes to the C++ and CUDA ops: element types and reduction ops.

Their one definition is csrc/includes/spd_codes.h; this module reads its two enums, so the
two sides cannot drift apart (a code renumbered there is renumbered here)."""

from __future__ import annotations

import re

import torch

from spd_ext.ops.builder import csrc_root

# spd_codes.h's element type names -> torch dtypes.
_TORCH_DTYPES = {"kFloat32": torch.float32, "kBFloat16": torch.bfloat16,
                 "kFloat16": torch.float16}


def read_enum(name: str, text: str) -> dict[str, int]:
    """``enum class <name> : int32_t { kA = 0, kB = 1 };`` in ``text`` (spd_codes.h) ->
    {"kA": 0, ...}."""
    match = re.search(r"enum\s+class\s+" + name + r"\s*:\s*int32_t\s*\{([^}]*)\}", text)
    if match is None:
        raise RuntimeError(f"spd_codes.h has no enum class {name}; reinstall spd_ext")
    codes = {}
    for item in match.group(1).split(","):
        key, _, value = item.partition("=")
        if key.strip():
            codes[key.strip()] = int(value)
    return codes


def _snake(name: str) -> str:
    """kWeighted -> weighted."""
    return name[1:].lower()


_text = (csrc_root() / "includes" / "spd_codes.h").read_text()
#: reduction op name ("sum", "mean", "weighted") -> its code.
OP_CODES: dict[str, int] = {_snake(k): v for k, v in read_enum("ReduceOp", _text).items()}
#: dtype -> its code.
DTYPE_CODES: dict[torch.dtype, int] = {_TORCH_DTYPES[k]: v
                                       for k, v in read_enum("DType", _text).items()}
#: the dtypes every spd_ext kernel takes, in the order of their codes.
KERNEL_DTYPES: tuple[torch.dtype, ...] = tuple(sorted(DTYPE_CODES, key=DTYPE_CODES.get))
del _text
