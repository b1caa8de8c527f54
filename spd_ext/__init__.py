"""spd_ext: cheaper-to-communicate distributed transformer training for PyTorch and DeepSpeed."""

__version__ = "0.1.0"
