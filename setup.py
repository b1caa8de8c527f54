"""spd_ext: reduced-communication distributed training for PyTorch and DeepSpeed.

Plain `pip install .` installs the Python package; the C++ ops then build on first use
(JIT, ninja). `SPD_BUILD_OPS=1 pip install --no-build-isolation .` prebuilds them against
the torch already installed (install torch first: an unpinned torch pulls CUDA wheels).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package so an installed copy can still JIT-build its ops."""

    def run(self) -> None:
        super().run()
        shutil.copytree(ROOT / "csrc", Path(self.build_lib) / "spd_ext" / "csrc",
                        dirs_exist_ok=True)


def prebuilt_ops() -> tuple[list, dict]:
    if os.environ.get("SPD_BUILD_OPS", "0") != "1":
        return [], {}
    sys.path.insert(0, str(ROOT))
    from torch.utils.cpp_extension import BuildExtension

    from spd_ext.ops import ALL_BUILDERS

    compatible = [b for b in ALL_BUILDERS if b.is_compatible()[0]]
    return ([b.cpp_extension() for b in compatible],
            {"build_ext": BuildExtension.with_options(use_ninja=True)})


ext_modules, ext_cmdclass = prebuilt_ops()

setup(
    name="spd_ext",
    version="0.1.0",
    description="Cheaper-to-communicate distributed transformer training: reduced-sync tensor "
    "parallelism, signal-weighted data parallelism, staleness control, fused collectives",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["spd_ext", "spd_ext.*"]),
    package_data={"spd_ext.serve": ["page.html"]},
    install_requires=[
        "torch>=2.1,<3",  # 2.13 (CPU or CUDA) satisfies this; install torch first
        "numpy>=1.24,<3",
        "ninja>=1.11,<2",  # JIT builds of the C++ ops
        "pyyaml>=6,<7",  # spd-ext train's YAML run configs
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.14,<1"],
        "hf": ["transformers>=4.40,<6", "accelerate>=1.1,<2", "datasets>=2.18,<5",
               "tiktoken>=0.6,<1"],
        "wandb": ["wandb>=0.16,<1"],
        "experiments": ["matplotlib>=3.7,<4"],  # the experiments' PNG plots
        "serve": ["aiohttp>=3.9,<4"],  # spd-ext serve
        # fault-tolerant DiLoCo islands: torchft's lighthouse, managers and healing
        "ft": ["torchft>=0.2,<0.3"],
        # openai: tests/test_serve.py talks to spd-ext serve with it (skipped without it)
        "dev": ["pytest>=8,<10", "ruff>=0.5,<1", "openai>=1.2,<4"],
    },
    entry_points={"console_scripts": ["spd-ext=spd_ext.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithSources, **ext_cmdclass},
    zip_safe=False,
)
