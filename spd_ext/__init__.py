"""spd_ext: cheaper-to-communicate distributed transformer training for PyTorch and DeepSpeed."""

import sys

from spd_ext.utils import process_exit

process_exit.install()  # a clean exit beside gloo's worker threads (no torch import here)

__version__ = "0.1.0"

if "torch" in sys.modules:  # registering needs torch; the CLI must start without it
    from spd_ext.comm.process_group import register_backend

    register_backend()  # torch.distributed.init_process_group("cpu:spd_ext") works now
