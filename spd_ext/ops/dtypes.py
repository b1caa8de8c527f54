"""The dtypes every spd_ext kernel takes, in the order of their codes in
csrc/includes/spd_dtype.h (0 float32, 1 bfloat16, 2 float16)."""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
