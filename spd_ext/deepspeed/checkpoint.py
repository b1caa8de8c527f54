"""DeepSpeed's checkpoint files read without running code.

DeepSpeed's checkpoint engine unpickles every file of a checkpoint with full pickle
semantics: a file replaced by a pickle whose ``__reduce__`` calls ``os.system`` runs its
command on ``load_checkpoint``. spd_ext reads them with
``weights_only=True`` instead, allowing only the few plain-data classes DeepSpeed's own
files hold (its loss scaler, the ZeRO stage enum, fragment addresses), so a crafted file
is refused with one line naming it:

* :func:`check_checkpoint_files` reads every file of a checkpoint that way before any
  rank starts (``spd-ext train --resume``);
* :func:`load_without_code` replaces the load of an engine's checkpoint engine
  (``spd_ext.deepspeed.initialize`` / ``attach``), so ``engine.load_checkpoint`` reads
  the same way in any script.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any

from spd_ext.errors import UsageError
from spd_ext.utils.files import load_weights_only

#: The classes DeepSpeed pickles into its checkpoints (ZeRO optimizer states): plain data,
#: rebuilt from their fields without calling any of their code.
DEEPSPEED_PLAIN_CLASSES = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


class UnsafeCheckpointError(UsageError):
    """A checkpoint file holds something other than tensors and plain data, or is damaged."""


@functools.lru_cache(maxsize=1)
def deepspeed_plain_classes() -> tuple[Any, ...]:
    """The classes of :data:`DEEPSPEED_PLAIN_CLASSES` this DeepSpeed has."""
    found = []
    for module, name in DEEPSPEED_PLAIN_CLASSES:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed version: its files cannot hold this class either
    return tuple(found)


def load_without_code(path: str | Path, map_location: Any = None, mmap: bool = False) -> Any:
    """One DeepSpeed checkpoint file, read with ``weights_only=True``."""
    try:
        return load_weights_only(path, "DeepSpeed checkpoint file", map_location,
                                 deepspeed_plain_classes(), mmap=mmap)
    except ValueError as exc:
        raise UnsafeCheckpointError(str(exc)) from None


def check_checkpoint_files(directory: Path) -> int:
    """Read every ``.pt`` file under ``directory`` (one checkpoint) without running code,
    mapping rather than reading tensors where the format allows; returns the number of
    files. Raises :class:`UnsafeCheckpointError` naming the first file refused."""
    files = sorted(directory.rglob("*.pt"))
    for path in files:
        load_without_code(path, map_location="cpu", mmap=True)
    return len(files)


def guard_checkpoint_loads(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read DeepSpeed's files with :func:`load_without_code`.

    Every DeepSpeed load of a checkpoint (model states, ZeRO partitions, the state-dict
    factory) goes through ``engine.checkpoint_engine.load(path, map_location)``; the engines
    that write with ``torch.save`` (the default ``TorchCheckpointEngine``, the decoupled and
    fast writers) get their load replaced on this instance. Others are left as they are."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None or not any(
            cls.__name__ in ("TorchCheckpointEngine", "DecoupledCheckpointEngine",
                             "FastCheckpointEngine")
            for cls in type(checkpoint_engine).__mro__):
        return

    def load(path: str, map_location: Any = None) -> Any:
        return load_without_code(path, map_location)

    checkpoint_engine.load = load
