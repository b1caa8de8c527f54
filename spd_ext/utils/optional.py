"""Optional dependencies, imported when a feature needs them, with the line that installs
them in the error."""

from __future__ import annotations

import os
from typing import Any

from spd_ext.errors import UsageError


def import_torchft(feature: str) -> Any:
    """torchft, for ``feature`` (named in the error when it is not installed)."""
    # torchft's Rust servers log every quorum and heartbeat at INFO unless told otherwise
    os.environ.setdefault("RUST_LOG", "warn")
    try:
        import torchft
    except ImportError as exc:
        raise UsageError(f"{feature} needs torchft ({exc}); install it with "
                         "`pip install 'spd_ext[ft]'` (or `pip install torchft`)") from None
    return torchft
