"""The two kinds of failure spd_ext tells apart.

A :class:`UsageError` is a mistake in what was asked for (a flag, a config key, a file, an
argument of a public function): its message names the problem and the fix, and the command
line prints it as one line and exits 2. Anything else is a defect of spd_ext (or of what it
runs on) and keeps its traceback. Both subclass the builtin a caller would expect
(``ValueError``, ``FileNotFoundError``), so ``except ValueError`` still catches them.
"""
from __future__ import annotations


class UsageError(ValueError):
    """A mistake in the input; the message says what is wrong and what to do instead."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file or folder that was named (or that the product needs) is not there."""
