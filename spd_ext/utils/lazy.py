"""Package attributes loaded on first use (PEP 562), so that importing one light module of a
package (a config schema, a name) does not load torch and the kernels with the rest."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(namespace: dict[str, Any], exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for a package whose ``exports`` map each public name to
    the module that defines it; ``namespace`` is the package's ``globals()``."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        # bound in the package, over a submodule of the same name the import may have set
        namespace[name] = value
        return value

    return __getattr__
