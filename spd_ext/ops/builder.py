"""Op builders in the DeepSpeed style: one class per C++ op.

An op is taken, in order, from
1. a module prebuilt at install time (``SPD_BUILD_OPS=1 pip install --no-build-isolation .``),
2. a JIT build of ``csrc/`` with ``torch.utils.cpp_extension`` and ninja, cached per
   torch version, Python version, vector ISA, checkout and flags (``~/.cache/spd_ext/ops``
   or ``$SPD_EXT_OPS_CACHE``) under a lock that dies with its holder (build_lock.py),
3. the op's pure-PyTorch fallback, chosen with one warning when 1 and 2 are impossible,
   or silently when ``SPD_EXT_FORCE_FALLBACK=1`` asks for it.

``setup.py`` asks each builder for its ``cpp_extension()`` to prebuild the ops.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import ClassVar

from spd_ext.errors import MissingFileError, UsageError
from spd_ext.ops.build_lock import build_lock, lock_state

# Compiler flags per vector ISA, and the /proc/cpuinfo flags each one needs at run time.
ISA_FLAGS: dict[str, list[str]] = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c",
               "-DSPD_ISA_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DSPD_ISA_AVX2"],
    "scalar": [],
}
ISA_REQUIRES: dict[str, frozenset[str]] = {
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "scalar": frozenset(),
}


def force_fallback() -> bool:
    """True when ``SPD_EXT_FORCE_FALLBACK`` asks every op to use its PyTorch fallback."""
    return os.environ.get("SPD_EXT_FORCE_FALLBACK", "0").lower() not in ("", "0", "false", "no")


def host_cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def isa_supported(isa: str) -> bool:
    return ISA_REQUIRES[isa] <= host_cpu_flags()


def host_isa() -> str:
    """The best vector ISA of this CPU, or ``$SPD_EXT_CPU_ISA`` when set (and supported)."""
    wanted = os.environ.get("SPD_EXT_CPU_ISA", "").lower()
    if wanted:
        if wanted not in ISA_FLAGS:
            raise UsageError(f"SPD_EXT_CPU_ISA={wanted!r} is not one of {', '.join(ISA_FLAGS)}")
        if not isa_supported(wanted):
            missing = sorted(ISA_REQUIRES[wanted] - host_cpu_flags())
            raise UsageError(f"SPD_EXT_CPU_ISA={wanted} needs CPU flags this host lacks: "
                             f"{' '.join(missing)}")
        return wanted
    if platform.machine() not in ("x86_64", "AMD64"):
        return "scalar"
    return next(isa for isa in ("avx512", "avx2", "scalar") if isa_supported(isa))


def csrc_root() -> Path:
    """``csrc/``: copied into the package by setup.py, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here.parents[1] / "csrc"):
        if (candidate / "includes").is_dir():
            return candidate
    raise MissingFileError(f"spd_ext C++ sources not found next to {here}; reinstall spd_ext")


class CUDAOpBuilder:
    """Mixin for ops with CUDA sources: compatible only where torch has CUDA and nvcc."""

    def is_compatible(self) -> tuple[bool, str]:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME

        if torch.version.cuda is None:
            return False, f"this torch ({torch.__version__}) is built without CUDA"
        if CUDA_HOME is None:
            return False, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
        if not torch.cuda.is_available():
            return False, "no CUDA device visible"
        return super().is_compatible()

    def cxx_flags(self, isa: str | None = None) -> list[str]:
        return ["-O3"]  # the C++ standard is torch's (C++20 for torch 2.13's headers)

    def nvcc_flags(self) -> list[str]:
        # No fast-math: IEEE division and rounding keep the results equal to the CPU's.
        return ["-O3", "--expt-relaxed-constexpr"]

    def ld_flags(self) -> list[str]:
        return []

    def target(self, module: ModuleType | None = None) -> str:
        """What the op runs on: this GPU's architecture, or "cuda" without one."""
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"sm_{major}{minor}"
        return "cuda"

    def shown_flags(self, target: str) -> list[str]:
        return self.nvcc_flags()


def _isa_of(module: ModuleType) -> str:
    """The vector ISA a built op was compiled for ("scalar" for ops without CPU kernels)."""
    return module.isa() if hasattr(module, "isa") else "scalar"


def _older_than_sources(built: Path) -> bool:
    """Whether any csrc/ source changed after ``built`` was compiled (an edited checkout)."""
    when = built.stat().st_mtime
    sources = [p for p in csrc_root().rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh")]
    return any(p.stat().st_mtime > when for p in sources)


def cache_root() -> Path:
    root = os.environ.get("SPD_EXT_OPS_CACHE") or Path.home() / ".cache" / "spd_ext" / "ops"
    return Path(root)


@dataclass
class OpStatus:
    """What `spd-ext report` prints for one op."""

    name: str
    compatible: bool
    reason: str
    built: str  # "prebuilt", "jit-cached", "loaded (jit)", "no"
    implementation: str  # "kernel", "fallback", "kernel (JIT on first use)"
    target: str  # vector ISA (CPU ops) or GPU architecture (CUDA ops)
    flags: list[str] = field(default_factory=list)
    build_lock: str = ""  # a held or stale JIT build lock, described; "" when none


class OpBuilder:
    """Compiles and loads one C++ op; subclasses name it and list its sources."""

    NAME: ClassVar[str]
    SOURCES: ClassVar[list[str]]  # relative to csrc/

    def __init__(self) -> None:
        self._module: ModuleType | None = None
        self._loaded = False
        self._how = "no"
        self._why_not = ""

    # -- what to build ------------------------------------------------------------
    @property
    def prebuilt_name(self) -> str:
        return f"spd_ext.ops._{self.NAME}_op"

    def sources(self) -> list[str]:
        root = csrc_root()
        return [str(root / s) for s in self.SOURCES]

    def include_dirs(self) -> list[str]:
        return [str(csrc_root() / "includes")]

    def cxx_flags(self, isa: str | None = None) -> list[str]:
        # The C++ standard is torch's (C++20 for torch 2.13's headers).
        return ["-O3", "-fopenmp", *ISA_FLAGS[isa or host_isa()]]

    def ld_flags(self) -> list[str]:
        # Resolves to the libgomp torch already loaded (same soname): one OpenMP runtime,
        # so torch.set_num_threads also governs the ops.
        return ["-fopenmp"]

    def is_compatible(self) -> tuple[bool, str]:
        if sys.platform != "linux":
            return False, f"needs Linux (this is {sys.platform})"
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            return False, f"no C++ compiler ({cxx}) on PATH"
        return True, ""

    def jit_arguments(self) -> dict[str, list[str]]:
        """What ``cpp_extension.load`` writes into build.ninja for this op."""
        return {"sources": self.sources(), "extra_cflags": self.cxx_flags(),
                "extra_cuda_cflags": getattr(self, "nvcc_flags", list)(),
                "extra_ldflags": self.ld_flags(), "extra_include_paths": self.include_dirs()}

    def build_dir(self) -> Path:
        """The JIT build directory: one per torch, Python, ISA, checkout and flags.

        The key holds the sources' absolute paths and the flags because build.ninja does:
        two checkouts of one version sharing a directory rewrote each other's build.ninja,
        so each load from one rebuilt over the other's build (and held torch's lock)."""
        import torch

        tag = f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{host_isa()}"
        key = json.dumps(self.jit_arguments(), sort_keys=True).encode()
        return cache_root() / tag / f"{self.NAME}-{hashlib.sha256(key).hexdigest()[:10]}"

    def jit_cached(self) -> bool:
        d = self.build_dir()
        return d.is_dir() and any(d.glob("*.so"))

    def cpp_extension(self):
        """The setuptools extension that prebuilds this op (used by setup.py)."""
        from torch.utils.cpp_extension import CppExtension, CUDAExtension

        root = csrc_root()
        sources = [os.path.relpath(s, root.parent) for s in self.sources()]
        if hasattr(self, "nvcc_flags"):
            return CUDAExtension(name=self.prebuilt_name, sources=sources,
                                 include_dirs=self.include_dirs(),
                                 extra_compile_args={"cxx": self.cxx_flags(),
                                                     "nvcc": self.nvcc_flags()})
        return CppExtension(
            name=self.prebuilt_name,
            sources=sources,
            include_dirs=self.include_dirs(),
            extra_compile_args=self.cxx_flags(),
            extra_link_args=self.ld_flags(),
        )

    # -- loading ------------------------------------------------------------------
    def load(self) -> ModuleType | None:
        """The compiled op, or None when the PyTorch fallback must be used."""
        if self._loaded:
            return self._module
        self._loaded = True
        self._module = self._load()
        return self._module

    def _load(self) -> ModuleType | None:
        if force_fallback():
            self._why_not = "forced by SPD_EXT_FORCE_FALLBACK=1"
            return None
        ok, why = self.is_compatible()
        if not ok:
            return self._give_up(why)
        try:
            module = importlib.import_module(self.prebuilt_name)
        except ImportError:
            module = None
        # Skip a prebuilt op built for a wider ISA than this CPU's (it would fault), or
        # older than its sources (an edited checkout): rebuild it with the JIT instead.
        if (module is not None and isa_supported(_isa_of(module))
                and not _older_than_sources(Path(module.__file__))):
            self._how = "prebuilt"
            return module
        try:
            module = self.jit_load()
        except Exception as exc:  # compiler errors, missing ninja, ...
            return self._give_up(f"JIT build failed: {str(exc).strip().splitlines()[-1]}")
        self._how = "loaded (jit)"
        return module

    def jit_load(self, verbose: bool | None = None) -> ModuleType:
        from torch.utils import cpp_extension

        build_dir = self.build_dir()
        if verbose is None:
            verbose = os.environ.get("SPD_EXT_VERBOSE_BUILD", "0") == "1"
        # torch takes its own lock file on every load and waits forever while one exists,
        # even when its owner died; ours is released by the kernel and clears a dead one.
        if not self.jit_cached():  # say so: a first build takes half a minute or more
            print(f"spd_ext: building op '{self.NAME}' once (about 30 s; cached in "
                  f"{build_dir})", file=sys.stderr, flush=True)
        with build_lock(build_dir, self.NAME):
            return cpp_extension.load(name=f"spd_ext_{self.NAME}", **self.jit_arguments(),
                                      build_directory=str(build_dir), verbose=verbose)

    def _give_up(self, why: str) -> None:
        self._why_not = why
        warnings.warn(f"spd_ext op '{self.NAME}' is unavailable ({why}); using its PyTorch "
                      "fallback. `spd-ext report` shows every op's state.",
                      RuntimeWarning, stacklevel=4)
        return None

    def status(self) -> OpStatus:
        """State without triggering a build (unless the op was already loaded)."""
        ok, why = self.is_compatible()
        lock = lock_state(self.build_dir())
        lock_note = "" if lock is None else lock.describe()
        if self._loaded:
            built = self._how if self._module is not None else "no"
            impl = "kernel" if self._module is not None else "fallback"
            target = self.target(self._module)
            return OpStatus(self.NAME, ok, why or self._why_not, built, impl, target,
                            self.shown_flags(target), lock_note)
        try:
            spec = importlib.util.find_spec(self.prebuilt_name)
        except (ImportError, ValueError):
            spec = None
        prebuilt = spec is not None and spec.origin is not None and not _older_than_sources(
            Path(spec.origin))  # a stale prebuilt op is rebuilt by the JIT when loaded
        built = "prebuilt" if prebuilt else "jit-cached" if self.jit_cached() else "no"
        if force_fallback():
            impl, why = "fallback", "forced by SPD_EXT_FORCE_FALLBACK=1"
        elif not ok:
            impl = "fallback"
        else:
            impl = "kernel" if built != "no" else "kernel (JIT on first use)"
        target = self.target()
        return OpStatus(self.NAME, ok, why, built, impl, target, self.shown_flags(target),
                        lock_note)

    def target(self, module: ModuleType | None = None) -> str:
        """What the op runs on: the vector ISA it was (or would be) compiled for."""
        return host_isa() if module is None else _isa_of(module)

    def shown_flags(self, target: str) -> list[str]:
        return self.cxx_flags(target)
