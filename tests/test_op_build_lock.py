"""JIT op builds never hang on a lock whose owner is gone, and say whom they wait for
while the owner lives (issue 30).

The op built here is a few lines of C against the Python C API alone (no torch headers),
so a build takes about a second. A compiler wrapper holds a build mid-compile until the
test lets it go, which makes "killed while compiling" and "two loads at once"
deterministic. Run as a script, this file is the loader process the tests start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from spd_ext.ops import build_lock
from spd_ext.ops.builder import OpBuilder

from conftest import FORCED_FALLBACK

TINY_SOURCE = r"""
#include <Python.h>
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, ""}, {}};
static PyModuleDef tiny = {PyModuleDef_HEAD_INIT, "spd_ext_tiny", nullptr, -1, methods};
PyMODINIT_FUNC PyInit_spd_ext_tiny(void) { return PyModule_Create(&tiny); }
"""

# Compiles (not torch's version checks) only once $TINY_OP_GATE/go exists, after touching
# $TINY_OP_GATE/compiling: the test sees the build midway and decides when it ends.
GATED_CXX = """#!/bin/sh
for arg in "$@"; do
  if [ "$arg" = "-c" ]; then
    touch "$TINY_OP_GATE/compiling"
    n=0
    while [ ! -e "$TINY_OP_GATE/go" ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
  fi
done
exec c++ "$@"
"""

LOAD_TIMEOUT_S = 60  # a load takes a few seconds; a hang fails here instead of at CI's limit

# The spd_ext C++ ops are not built here, so the forced-fallback run has nothing to add.
builds = pytest.mark.skipif(FORCED_FALLBACK, reason="JIT builds of a test op; the same "
                            "whether or not SPD_EXT_FORCE_FALLBACK=1 (run once, unforced)")


class TinyOp(OpBuilder):
    """A test-only op: one small C++ file with a Python module init and no torch."""

    NAME = "tiny"
    SOURCES = []

    def __init__(self, source: Path) -> None:
        super().__init__()
        self.source = str(source)

    def sources(self) -> list[str]:
        return [self.source]

    def include_dirs(self) -> list[str]:
        return []

    def cxx_flags(self, isa: str | None = None) -> list[str]:
        return []

    def ld_flags(self) -> list[str]:
        return []


@dataclass
class Tiny:
    source: Path
    gate: Path  # the wrapper's "compiling" and "go" files
    build_dir: Path
    env: dict[str, str]

    def start(self, log: str) -> tuple[subprocess.Popen, Path, Path]:
        """A loader process in its own session (killed as a group); its stdout, stderr."""
        out, err = self.gate / f"{log}.out", self.gate / f"{log}.err"
        with open(out, "w") as o, open(err, "w") as e:
            proc = subprocess.Popen([sys.executable, __file__, str(self.source)], env=self.env,
                                    stdout=o, stderr=e, start_new_session=True)
        return proc, out, err

    def load(self, log: str) -> tuple[str, str]:
        """Load in a new process; fails (not hangs) if it does not finish in time."""
        proc, out, err = self.start(log)
        try:
            proc.wait(timeout=LOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the load hangs (> {LOAD_TIMEOUT_S} s); stderr:\n{err.read_text()}")
        finally:
            _kill(proc)
        assert proc.returncode == 0, err.read_text()
        return out.read_text(), err.read_text()


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tiny:
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    cxx = tmp_path / "g++-gated"
    cxx.write_text(GATED_CXX)
    cxx.chmod(0o755)
    monkeypatch.setenv("SPD_EXT_OPS_CACHE", str(tmp_path / "cache"))
    env = {**os.environ, "CXX": str(cxx), "TINY_OP_GATE": str(tmp_path)}
    return Tiny(source, tmp_path, TinyOp(source).build_dir(), env)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL to what is left of a loader's session (its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {LOAD_TIMEOUT_S} s")
        time.sleep(0.05)


@builds
def test_a_build_killed_midway_does_not_block_the_next_load(tiny: Tiny) -> None:
    """SIGKILL to the loader alone, as ``kill -9`` or the OOM killer sends it: its ninja
    and compiler go on. The next load waits for that ninja, saying so, then builds."""
    proc, _, err = tiny.start("killed")
    try:
        _wait_for((tiny.gate / "compiling").exists, "compile started")
        baton = tiny.build_dir / build_lock.TORCH_BATON
        assert baton.exists(), err.read_text()  # torch's lock, taken around the build
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert baton.exists()  # what hung every later load
        proc_next, out, err = tiny.start("next")
        try:
            _wait_for(lambda: "left running" in err.read_text(), "message about the ninja")
            (tiny.gate / "go").touch()  # the orphaned build finishes
            proc_next.wait(timeout=LOAD_TIMEOUT_S)
        finally:
            _kill(proc_next)
    finally:
        _kill(proc)  # the orphans: ninja and the compiler wrapper
    assert proc_next.returncode == 0 and out.read_text().strip() == "loaded 42", err.read_text()
    said = err.read_text()
    assert "waiting 0 s so far for ninja (pid " in said, said
    assert f"left running in {tiny.build_dir} by a killed build of op 'tiny'" in said, said
    assert f"removed {baton}, left by a build of op 'tiny' that was killed" in said


@builds
def test_a_lock_file_left_from_before_does_not_block(tiny: Tiny) -> None:
    """A torch ``lock`` with no owner (0 bytes, as a killed build left it before)."""
    tiny.build_dir.mkdir(parents=True)
    (tiny.build_dir / build_lock.TORCH_BATON).touch()
    (tiny.gate / "go").touch()
    out, err = tiny.load("after")
    assert out.strip() == "loaded 42"
    assert "left by a build of op 'tiny' that was killed" in err


@builds
def test_two_loads_at_once_both_succeed_and_the_waiter_names_the_builder(tiny: Tiny) -> None:
    first, first_out, first_err = tiny.start("first")
    second = None
    try:
        _wait_for((tiny.gate / "compiling").exists, "compile started")
        second, second_out, second_err = tiny.start("second")
        _wait_for(lambda: "waiting" in second_err.read_text(), "waiting message")
        (tiny.gate / "go").touch()
        for proc in (first, second):
            proc.wait(timeout=LOAD_TIMEOUT_S)
    finally:
        _kill(first)
        if second is not None:
            _kill(second)
    assert first.returncode == 0, first_err.read_text()
    assert second.returncode == 0, second_err.read_text()
    assert first_out.read_text().strip() == second_out.read_text().strip() == "loaded 42"
    waiting = second_err.read_text()
    assert (f"for the build of op 'tiny' in {tiny.build_dir} by pid {first.pid}, for "
            in waiting), waiting


def test_two_checkouts_never_share_a_build_directory(tmp_path, monkeypatch) -> None:
    """build.ninja holds the sources' absolute paths: two checkouts of one version that
    shared a directory rebuilt over each other's build on every load (taking the lock)."""
    monkeypatch.setenv("SPD_EXT_OPS_CACHE", str(tmp_path / "cache"))
    clone, work = TinyOp(tmp_path / "clone" / "tiny.cpp"), TinyOp(tmp_path / "work" / "tiny.cpp")
    assert clone.build_dir() != work.build_dir()
    before = clone.build_dir()
    assert TinyOp(tmp_path / "clone" / "tiny.cpp").build_dir() == before  # kept across loads
    monkeypatch.setattr(TinyOp, "cxx_flags", lambda self, isa=None: ["-O1"])
    assert clone.build_dir() != before  # other flags, another build.ninja


def test_clean_removes_stale_build_locks_and_keeps_held_ones(tmp_path, monkeypatch,
                                                             capsys) -> None:
    from spd_ext.cli import main

    monkeypatch.setenv("SPD_EXT_OPS_CACHE", str(tmp_path))
    stale, held = tmp_path / "torch-x" / "tiny-aaaa", tmp_path / "torch-x" / "tiny-bbbb"
    stale.mkdir(parents=True)
    (stale / build_lock.TORCH_BATON).touch()
    with build_lock.build_lock(held, "tiny"):
        (held / build_lock.TORCH_BATON).touch()  # a live build's torch lock
        assert main(["clean", "--dry-run"]) == 0
        listed = capsys.readouterr().out
        assert f"stale: {stale / 'lock'}" in listed and str(held) not in listed
        assert (stale / "lock").exists()  # a dry run removes nothing
        assert main(["clean"]) == 0
        assert f"removed: {stale / 'lock'}" in capsys.readouterr().out
        assert not (stale / "lock").exists() and (held / "lock").exists()


def test_report_shows_a_stale_and_a_held_build_lock(tmp_path, monkeypatch, capsys) -> None:
    from spd_ext.cli import main
    from spd_ext.ops import ALL_BUILDERS

    monkeypatch.setenv("SPD_EXT_OPS_CACHE", str(tmp_path))
    op = ALL_BUILDERS[0]
    build_dir = op.build_dir()
    build_dir.mkdir(parents=True)
    (build_dir / build_lock.TORCH_BATON).touch()
    assert main(["report"]) == 0
    assert (f"build lock of {op.NAME}: stale: {build_dir / 'lock'} was left by a build "
            "that was killed") in capsys.readouterr().out
    with build_lock.build_lock(build_dir, op.NAME):
        assert main(["report"]) == 0
        shown = capsys.readouterr().out
    assert f"build lock of {op.NAME}: held by pid {os.getpid()}, for 0 s" in shown


if __name__ == "__main__":
    # The loader process of the tests above: load the tiny op built from argv[1].
    build_lock.NOTICE_AFTER_S = 0.0  # say at once whom it waits for
    print("loaded", TinyOp(Path(sys.argv[1])).jit_load().answer(), flush=True)
