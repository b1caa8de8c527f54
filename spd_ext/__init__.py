"""spd_ext: cheaper-to-communicate distributed transformer training for PyTorch and DeepSpeed."""

import spd_ext.utils.process_exit  # noqa: F401  (a clean exit beside gloo's worker threads)

__version__ = "0.1.0"
