"""What `spd-ext serve`'s front end and the ranks' first rank say to each other over their
pipe: one frozen dataclass per message, so each side reads fields by name and a message
changed on one side fails on the other at once (pickled by the pipe)."""
from __future__ import annotations

from dataclasses import dataclass, field


# -- front end -> first rank ---------------------------------------------------------------
@dataclass(frozen=True)
class Generate:
    """A completion to generate (checked by the front end, and again by the rank)."""

    request: int
    ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    seed: int | None


@dataclass(frozen=True)
class Cancel:
    """The client went away: stop its request, queued or running."""

    request: int


@dataclass(frozen=True)
class Stop:
    """Shut down once the queue is empty."""


# -- first rank -> front end ---------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    """Every rank has loaded its shards."""

    pids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Token:
    """One generated token: its index in the completion, the seconds its step took, the
    step's synchronizations and the positions that forward processed (prompt, then 1)."""

    request: int
    index: int
    token: int
    seconds: float
    syncs: int
    positions: int


@dataclass(frozen=True)
class Done:
    """The request is finished: ``reason`` is "length" or "cancelled"."""

    request: int
    reason: str


@dataclass(frozen=True)
class _Failed:
    """A request that ended without its tokens, and why."""

    request: int
    message: str


@dataclass(frozen=True)
class Refused(_Failed):
    """The rank refused the request's arguments (a 400)."""


@dataclass(frozen=True)
class Fault(_Failed):
    """The request failed on a rank (a 500); the ranks go on serving."""


@dataclass(frozen=True)
class RanksFailed(_Failed):
    """The front end's own: a rank has failed, so has every request (a 503)."""


#: the messages after which a request gets no more
LAST = (Done, Refused, Fault, RanksFailed)
