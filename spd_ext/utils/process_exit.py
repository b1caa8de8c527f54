"""A clean interpreter exit next to torch.distributed's gloo back-end.

gloo runs collectives on worker threads. A worker drops a finished collective's tensors
just after the caller sees it complete, and dropping a tensor whose Python object is gone
takes the GIL. If that happens while Python finalizes, the interpreter kills the thread
inside C++, which aborts the whole process ("terminate called without an active
exception", exit code -6) after all its work is done: a rank that trained fine fails its
launcher. Two things leave a group's workers alive at exit, and spd_ext answers both:

- a group kept past ``destroy_process_group``: torch.distributed.nn.functional binds
  ``group=group.WORLD`` as default arguments when first imported, and building the first
  torch.optim optimizer imports it (through torch._dynamo), holding the default group for
  good. Imported as soon as torch is (no group exists yet then), its defaults are None.
  ``import spd_ext`` does not import torch itself (``spd-ext --help`` answers at once):
  it imports that module at once if torch is loaded already, or else right after torch
  finishes loading (an import hook that runs once).
- a group still open at exit (Hugging Face's Trainer, for one, never destroys it): an
  atexit handler gives live gloo workers a moment, without the GIL, to finish.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.util
import os
import sys
import time
from typing import Any

#: Longest wait at exit for gloo workers to drop their last collective (they take
#: microseconds unless the machine is overloaded).
SETTLE_S = 0.2


def _gloo_workers() -> int:
    """Live gloo worker threads of this process (Linux; 0 where it cannot tell)."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += f.read().strip() == "pt_gloo_runloop"
        except OSError:  # a thread that ended meanwhile
            pass
    return count


@atexit.register
def _settle_gloo_workers() -> None:
    if _gloo_workers():
        time.sleep(SETTLE_S)  # releases the GIL for the workers' last decrefs


def _bind_functional_defaults() -> None:
    import torch.distributed

    if torch.distributed.is_available():
        import torch.distributed.nn.functional  # noqa: F401  (see the module docstring)


class _AfterTorch(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``torch`` is first imported, its loader is wrapped so
    that :func:`_bind_functional_defaults` runs once torch has loaded; then it leaves."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")  # the real finders (this one has left)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_torch = loader.exec_module

        def exec_module(module: Any) -> None:
            exec_torch(module)
            _bind_functional_defaults()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Called by ``import spd_ext``."""
    if "torch" in sys.modules:
        _bind_functional_defaults()
    elif not any(isinstance(f, _AfterTorch) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTorch())
