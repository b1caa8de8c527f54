"""spd_ext: cheaper-to-communicate distributed transformer training for PyTorch and DeepSpeed."""

from spd_ext.utils import process_exit

process_exit.install()  # a clean exit beside gloo's worker threads (no torch import here)

__version__ = "0.1.0"
