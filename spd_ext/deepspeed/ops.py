"""DeepSpeed's JIT-compiled ops that spd_ext's entry points load, loaded under spd_ext's
build lock, each DeepSpeed install in a cache directory of its own.

``deepspeed.init_distributed`` loads DeepSpeed's CPU communication op (``deepspeed_shm_comm``)
through ``torch.utils.cpp_extension.load`` in every rank of every job, and torch takes a
lock file in the op's build directory each time, even when nothing needs compiling. A rank
killed during that moment leaves the file behind, and every later DeepSpeed job on the host
then waits for it forever, silently (spd_ext's own ops had the same failure; see
spd_ext.ops.build_lock). And torch's default directory is shared by every DeepSpeed install
on the host, whose build files name their own paths: two virtual environments rebuild the
op over each other (a minute each time, during which a killed rank leaves the lock).

So spd_ext loads the op first, under its own lock (which dies with its holder), in a
directory keyed by the DeepSpeed install and torch version (unless ``TORCH_EXTENSIONS_DIR``
names one); DeepSpeed then finds it loaded.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from spd_ext.ops.build_lock import build_lock

#: DeepSpeed's op builders that spd_ext's entry points (spd-ext train, initialize, bench)
#: reach on this accelerator.
COMM_OP_BUILDER = "ShareMemCommBuilder"


def deepspeed_ops_root() -> Path:
    """Where spd_ext has DeepSpeed's JIT ops built: ``$TORCH_EXTENSIONS_DIR`` when set, else
    a directory of torch's default root keyed by this DeepSpeed install and torch."""
    import deepspeed
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    install = f"{Path(deepspeed.__file__).resolve().parent}|{torch.__version__}"
    key = hashlib.sha256(install.encode()).hexdigest()[:10]
    return Path(get_default_build_root()) / f"deepspeed-{deepspeed.__version__}-{key}"


def _comm_op_builder():  # noqa: ANN202 - DeepSpeed's OpBuilder, or None
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builder = get_accelerator().create_op_builder(COMM_OP_BUILDER)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False) \
            or installed_ops.get(builder.name, False):
        return None
    return builder


def deepspeed_comm_op_state() -> str | None:
    """What `spd-ext report` says of DeepSpeed's comm op (None: DeepSpeed uses none here,
    or has it prebuilt). Builds nothing."""
    from spd_ext.ops.build_lock import lock_state

    builder = _comm_op_builder()
    if builder is None:
        return None
    directory = deepspeed_ops_root() / builder.name
    built = (directory / f"{builder.name}.so").exists()
    text = (f"DeepSpeed's {builder.name}: " + (f"built in {directory}" if built else
            "not built yet: the first DeepSpeed job builds it (about a minute on 2 cores; "
            "`spd-ext report --build` does it now)"))
    lock = lock_state(directory) if directory.is_dir() else None
    return text + (f"; build lock {lock.describe()}" if lock is not None else "")


def load_deepspeed_comm_op() -> Path | None:
    """Load DeepSpeed's CPU communication op under spd_ext's build lock, before
    ``deepspeed.init_distributed`` does; returns its build directory, or None where
    DeepSpeed uses no such op (another accelerator, an incompatible host) or has it
    prebuilt, which is then left to DeepSpeed."""
    builder = _comm_op_builder()
    if builder is None:
        return None
    root = deepspeed_ops_root()
    directory = root / builder.name
    previous = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)  # torch's load reads it (only there)
    try:
        with build_lock(directory, builder.name, shared=True):
            if not (directory / f"{builder.name}.so").exists():  # said by the builder alone
                print(f"spd_ext: building DeepSpeed's op '{builder.name}' once for this install "
                      f"(about a minute on 2 cores; cached in {directory})", file=sys.stderr,
                      flush=True)
            builder.load(verbose=False)
    finally:
        if previous is None:
            del os.environ["TORCH_EXTENSIONS_DIR"]
        else:
            os.environ["TORCH_EXTENSIONS_DIR"] = previous
    return directory
