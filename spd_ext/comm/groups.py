"""What the per-process-group collective back-ends share: settings from the environment,
host identity, the one-time set-up registry, and the check that a group can use a
single-host kernel at all."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def env_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of bytes") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def host_id() -> str:
    """Two ranks may share memory only if this string is equal for both."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def group_key(group: Any) -> Any:
    return dist.group.WORLD if group is None else group


def single_host_reason(group: Any, op_loaded: bool, op_name: str, why_not: str) -> str | None:
    """Why ``group`` cannot use a single-host kernel (collective), or None if it can:
    every rank must have the op and all must share one host."""
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, {"host": host_id(), "op": op_loaded}, group=group)
    no_op = [r for r, info in enumerate(everyone) if not info["op"]]
    if no_op:
        return f"the {op_name} op is unavailable on ranks {no_op}: {why_not}"
    hosts = sorted({info["host"].split("/")[0] for info in everyone})
    if len({info["host"] for info in everyone}) > 1:
        return f"ranks span {len(hosts)} hosts ({', '.join(hosts)})"
    return None


class GroupRegistry(Generic[T]):
    """Per process group: its context, or the reason it has none; set up once, on first use
    (collectively), by ``setup(group) -> context | reason``."""

    def __init__(self, setup: Callable[[Any], T | str]) -> None:
        self._setup = setup
        self._entries: dict[Any, T | str] = {}

    def get(self, group: Any = None) -> T | None:
        key = group_key(group)
        if key not in self._entries:
            self._entries[key] = self._setup(group)
        entry = self._entries[key]
        return None if isinstance(entry, str) else entry

    def cached(self, group: Any = None) -> T | None:
        """The context if already set up (a dict lookup: the per-call fast path)."""
        entry = self._entries.get(group_key(group))
        return None if entry is None or isinstance(entry, str) else entry

    def entry(self, group: Any = None) -> T | str | None:
        return self._entries.get(group_key(group))

    def describe(self, group: Any, decided_by: str, describe_context: Callable[[T], str]) -> str:
        """The group's path in words, as set up so far."""
        entry = self.entry(group)
        if entry is None:
            return f"not set up yet (decided by {decided_by})"
        if isinstance(entry, str):
            return f"torch.distributed ({entry})"
        return describe_context(entry)

    def clear(self) -> None:
        self._entries.clear()
