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
  good. Imported by ``import spd_ext``, before any group exists, its defaults are None.
- a group still open at exit (Hugging Face's Trainer, for one, never destroys it): an
  atexit handler gives live gloo workers a moment, without the GIL, to finish.
"""

from __future__ import annotations

import atexit
import os
import time

import torch.distributed

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


if torch.distributed.is_available():
    import torch.distributed.nn.functional  # noqa: F401  (see the module docstring)
