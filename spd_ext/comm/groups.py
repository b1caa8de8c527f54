"""What the per-process-group collective back-ends share: settings from the environment,
host identity, the one-time set-up registry and its exchange, and the check that a group
can use a single-host kernel at all."""

from __future__ import annotations

import base64
import json
import math
import os
import socket
import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Generic, TypeVar

import torch.distributed as dist

from spd_ext.comm.torch_private import default_store, group_name, live_groups
from spd_ext.errors import UsageError

T = TypeVar("T")
#: Seconds of one wait inside the store during a set-up (signals are handled between).
_WAIT_SLICE_S = 0.25


class CommError(RuntimeError):
    """A collective failed: a peer timed out or died, or ranks passed different tensors."""


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed waiting for other ranks: spd_ext's
    CommError, torch.distributed's DistError types, and gloo's timeouts and lost
    connections, which reach Python as a plain RuntimeError naming gloo's source."""
    if isinstance(exc, (CommError, dist.DistError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        sign in text for sign in ("gloo/", "Timed out waiting", "Connection closed by peer",
                                  "Connection reset by peer"))


def default_timeout() -> float:
    """Seconds a rank waits for a peer (``SPD_EXT_COMM_TIMEOUT``, default 300): inside a
    call, each wait for a peer that makes no progress; at set-up, each step."""
    raw = os.environ.get("SPD_EXT_COMM_TIMEOUT", "300")
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"SPD_EXT_COMM_TIMEOUT={raw!r} is not a number of seconds") from None
    return check_timeout(value, "SPD_EXT_COMM_TIMEOUT")


def check_timeout(value: float, what: str = "timeout") -> float:
    """``value`` if it is a finite, positive number of seconds; otherwise ValueError (a
    zero timeout would fail the call at once and leave this rank's group unusable)."""
    if not (isinstance(value, (int, float)) and 0 < value < math.inf):
        raise UsageError(f"{what} must be a finite, positive number of seconds, got {value!r}")
    return float(value)


def env_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number of bytes") from None
    if value <= 0:
        raise UsageError(f"{name} must be positive, got {value}")
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


def background_group(group: Any = None) -> Any:
    """A new process group with the ranks of ``group``, for collectives a worker thread
    issues while the main thread keeps using ``group``. Two threads' calls on one group
    would pair with different calls on other ranks (spd_ext refuses it); on separate
    groups each thread's calls pair among themselves. Collective over the default group:
    every rank calls it, at the same point."""
    if dist.get_world_size() == 1:
        return group
    mine = dist.get_process_group_ranks(group or dist.group.WORLD)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    own = None
    # torch.distributed.new_group must be called by every rank, for every group, in the
    # same order: one call per distinct rank list, in first-seen order.
    for ranks in dict.fromkeys(tuple(r) for r in everyone):
        created = dist.new_group(list(ranks))
        if list(ranks) == mine:
            own = created
    return own


def _encode(value: Any) -> bytes:
    return json.dumps(value, default=lambda b: {"bytes": base64.b64encode(b).decode()}).encode()


def _decode(raw: bytes) -> Any:
    return json.loads(raw, object_hook=lambda d: base64.b64decode(d["bytes"])
                      if d.keys() == {"bytes"} else d)


class SetupExchange:
    """The collectives of a group's one-time set-up, through the process group's store.

    Each step waits at most ``timeout`` seconds and then raises :class:`CommError` naming
    the ranks that did not arrive; gloo's collectives would wait for the process group's
    own timeout (30 minutes by default) and fail naming no one. Values travel as JSON
    (bytes allowed), never pickles.
    """

    def __init__(self, group: Any, what: str, timeout: float | None = None) -> None:
        self._start(default_store(), group_name(group_key(group)), dist.get_rank(group),
                    dist.get_world_size(group),
                    dist.get_process_group_ranks(group_key(group)), what, timeout)

    @classmethod
    def over_store(cls, store: dist.Store, rank: int, world_size: int,
                   global_ranks: list[int], what: str,
                   timeout: float | None = None) -> SetupExchange:
        """The exchange of a group still being created (torch.distributed's backend
        creator): its own store, rank and size, as torch hands them over."""
        exchange = cls.__new__(cls)
        exchange._start(store, "", rank, world_size, global_ranks, what, timeout)
        return exchange

    def _start(self, store: dist.Store, group: str, rank: int, world_size: int,
               global_ranks: list[int], what: str, timeout: float | None) -> None:
        self.what = what
        self.timeout = default_timeout() if timeout is None else timeout
        self.rank = rank
        self.world_size = world_size
        self.global_ranks = global_ranks
        prefix = f"spd_ext/{what}/{group}"
        # A store can outlive its process group (destroy_process_group, then a new group on
        # the same store): numbering this rank's set-ups of the group keeps a new set-up
        # from reading an old one's keys. Every rank sets a group up equally often.
        generation = store.add(f"{prefix}/generation/{self.rank}", 1)
        self.store = dist.PrefixStore(f"{prefix}/{generation}/", store)
        self.step = 0

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in group rank order."""
        self.step += 1
        self.store.set(f"{self.step}/{self.rank}", _encode(value))
        keys = [f"{self.step}/{r}" for r in range(self.world_size)]
        self._wait(keys)
        return [_decode(self.store.get(k)) for k in keys]

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """Group rank ``src``'s ``value`` on every rank."""
        self.step += 1
        key = f"{self.step}/{src}"
        if self.rank == src:
            self.store.set(key, _encode(value))
            return value
        self._wait([key])
        return _decode(self.store.get(key))

    def _wait(self, keys: list[str]) -> None:
        # In slices: a Python signal handler runs only between bytecodes, so one wait
        # inside the store's C++ for the whole timeout would hold back a SIGTERM handler
        # (rank 0's, which unlinks its segment's name) until a dead peer's timeout ran out,
        # and a launcher's SIGKILL comes long before that.
        deadline = time.monotonic() + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            wait_s = max(0.001, min(_WAIT_SLICE_S, remaining))
            started = time.monotonic()
            try:
                self.store.wait(keys, timedelta(seconds=wait_s))
                return
            except Exception:  # the store's timeout error type differs across torch versions
                timed_out = time.monotonic() - started >= wait_s / 2  # not a store failure
                if timed_out and remaining > _WAIT_SLICE_S:
                    continue
                missing = [int(k.rsplit("/", 1)[1]) for k in keys if not self.store.check([k])]
                if not missing or not timed_out:
                    raise
            break
        names = ", ".join(f"{r} (global rank {self.global_ranks[r]})" for r in missing)
        raise CommError(
            f"spd_ext.comm: group rank {names} did not reach step {self.step} of the "
            f"{self.what} set-up within {self.timeout:g} s (rank {self.rank} waited); "
            "every rank of the group must make the same collective calls on it. The limit "
            "is all_reduce(timeout=...) or SPD_EXT_COMM_TIMEOUT; the group is unusable now")


def single_host_reason(exchange: SetupExchange, op_loaded: bool, op_name: str,
                       why_not: str) -> str | None:
    """Why the group cannot use a single-host kernel (collective), or None if it can:
    every rank must have the op and all must share one host."""
    everyone = exchange.all_gather({"host": host_id(), "op": op_loaded})
    no_op = [r for r, info in enumerate(everyone) if not info["op"]]
    if no_op:
        return f"the {op_name} op is unavailable on ranks {no_op}: {why_not}"
    hosts = sorted({info["host"].split("/")[0] for info in everyone})
    if len({info["host"] for info in everyone}) > 1:
        return f"ranks span {len(hosts)} hosts ({', '.join(hosts)})"
    return None


class GroupRegistry(Generic[T]):
    """Per process group: its context, or the reason it has none; set up once, on first use
    (collectively), by ``setup(group, timeout) -> context | reason``.

    The registry holds groups weakly and closes a group's context (its mappings released)
    when the group goes: when torch.distributed drops it (``destroy_process_group``) and
    nothing else holds it, or, for a destroyed group something still holds, at the next
    set-up. A strong reference here would keep the group, and gloo's worker threads, alive
    until interpreter exit, where their last clean-up takes the GIL during finalization and
    aborts the process ("terminate called without an active exception").
    """

    def __init__(self, setup: Callable[[Any, float | None], T | str]) -> None:
        self._setup = setup
        #: id(group) -> (a weak reference to the group, its context or reason)
        self._entries: dict[int, tuple[weakref.ref, T | str]] = {}

    def get(self, group: Any = None, timeout: float | None = None) -> T | None:
        key = group_key(group)
        found = self._entries.get(id(key))
        if found is None:
            self._release_destroyed()
            found = (weakref.ref(key, self._group_gone), self._setup(group, timeout))
            self._entries[id(key)] = found
        entry = found[1]
        return None if isinstance(entry, str) else entry

    def _group_gone(self, ref: weakref.ref) -> None:
        for key, (held, _) in list(self._entries.items()):
            if held is ref:
                _close(self._entries.pop(key)[1])

    def _release_destroyed(self) -> None:
        live = live_groups()
        if live is None:
            return
        for key, (ref, _) in list(self._entries.items()):
            if ref() not in live:
                _close(self._entries.pop(key)[1])

    def cached(self, group: Any = None) -> T | None:
        """The context if already set up (a dict lookup: the per-call fast path)."""
        found = self._entries.get(id(group_key(group)))
        return None if found is None or isinstance(found[1], str) else found[1]

    def entry(self, group: Any = None) -> T | str | None:
        found = self._entries.get(id(group_key(group)))
        return None if found is None else found[1]

    def describe(self, group: Any, decided_by: str, describe_context: Callable[[T], str]) -> str:
        """The group's path in words, as set up so far."""
        entry = self.entry(group)
        if entry is None:
            return f"not set up yet (decided by {decided_by})"
        if isinstance(entry, str):
            return f"torch.distributed ({entry})"
        return describe_context(entry)

    def clear(self) -> None:
        """Close every context (tests; a process group's contexts otherwise live as long
        as the group)."""
        for _, entry in self._entries.values():
            _close(entry)
        self._entries.clear()


def _close(entry: Any) -> None:
    close = getattr(entry, "close", None)  # a reason (str) has nothing to close
    if close is not None:
        close()
