"""The rank program of `spd-ext serve`: every rank holds its shards of the model; the
group's first rank takes requests from the front end (a pipe), announces each to the
other ranks through the process group, and streams the tokens back.

The pipe carries the messages of spd_ext.serve.messages: Generate, Cancel and Stop from
the front end; Ready, then Token, Done, Refused or Fault per request from the first rank.
Rank 0 -> every rank, per request (broadcast): an int64 header [command, prompt length,
max tokens, top_k or -1, seed or -1], the temperature, then the prompt's ids. An idle
first rank sends a header alone (KEEPALIVE) at ``keepalive_interval`` of the process
group's timeout, so the other ranks' wait never reaches that timeout however long the
server idles, while a rank that stops answering is still found within it.

A request that fails on a rank (an exception of the generation, not of the group: NaN
probabilities from a broken model, an allocation that fails) fails that request only:
every rank catches it, and after each request the ranks agree in one small collective
whether any of them failed, so they stay in lock step (generation itself ends a failed
step on every rank together; see spd_ext.tp.generation.StepFailed). Errors that break the
group or the pipe (a peer dead or timed out, the front end gone) still end the rank, and
the launcher stops the others.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from spd_ext.comm.groups import is_peer_failure
from spd_ext.serve.messages import Cancel, Done, Fault, Generate, Ready, Refused, Stop, Token
from spd_ext.serve.model_source import ModelSource
from spd_ext.tp import DistributedComm
from spd_ext.tp.generation import DecodeStep, StepFailed, check_prompt, check_sampling

GENERATE, STOP, KEEPALIVE = 1, 2, 3
HEADER = 5


def keepalive_interval(pg_timeout_s: float) -> float:
    """Seconds between an idle first rank's keepalives: well inside the timeout (a busy
    host may delay one), at most 10."""
    return min(10.0, pg_timeout_s / 4)


#: A GENERATE command's request: prompt [1, T], max tokens, temperature, top_k, seed.
Request = tuple[torch.Tensor, int, float, int | None, int | None]


def _announce(command: int, ids: list[int] | None = None, max_tokens: int = 0,
              temperature: float = 0.0, top_k: int | None = None,
              seed: int | None = None) -> tuple[int, Request | None]:
    """Broadcast one command from rank 0; every rank returns what rank 0 sent: the command
    and, for GENERATE, its request."""
    header = torch.zeros(HEADER, dtype=torch.int64)
    temp = torch.zeros(1, dtype=torch.float64)
    if dist.get_rank() == 0:
        header[:] = torch.tensor([command, len(ids or []), max_tokens,
                                  -1 if top_k is None else top_k, -1 if seed is None else seed])
        temp[0] = temperature
    dist.broadcast(header, src=0)
    command, length, max_tokens, top_k_, seed_ = (int(v) for v in header)
    if command != GENERATE:
        return command, None
    dist.broadcast(temp, src=0)
    prompt = (torch.tensor([ids], dtype=torch.int64) if dist.get_rank() == 0
              else torch.empty(1, length, dtype=torch.int64))
    dist.broadcast(prompt, src=0)
    return command, (prompt, max_tokens, float(temp[0]), None if top_k_ < 0 else top_k_,
                     None if seed_ < 0 else seed_)


def _breaks_the_group(exc: BaseException) -> bool:
    """Whether ``exc`` means the ranks or the pipe are broken (the rank must end), rather
    than that one request failed."""
    if isinstance(exc, StepFailed):
        return False
    return is_peer_failure(exc) or isinstance(exc, (OSError, EOFError))


def _generate(model: Any, request: Request, vocab_size: int,
              should_stop: Callable[[], bool] | None = None,
              on_step: Callable[[DecodeStep], None] | None = None) -> str | None:
    """Run one request on this rank: None when it went through, else its failure in one
    line (the traceback goes to the server's log). A failure on another rank that ended a
    step here (StepFailed raised on a rank that did not fail) is that rank's to tell."""
    steps = model.generate_steps(*request, should_stop=should_stop, vocab_size=vocab_size)
    while True:
        try:
            step = next(steps)
        except StopIteration:
            return None
        except Exception as exc:  # noqa: BLE001 - sorted below: this request, or the group
            if _breaks_the_group(exc):
                raise
            if isinstance(exc, StepFailed) and not exc.here:
                return None
            print(f"spd-ext serve: rank {dist.get_rank()}: a request failed (the ranks go "
                  f"on):\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            # StepFailed already names its cause: "RuntimeError: probability tensor ..."
            told = str(exc) if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {exc}"
            return told.splitlines()[0]
        if on_step is not None:
            on_step(step)  # its errors (the pipe) are not the request's


def _agree(error: str | None) -> str | None:
    """After each request, on every rank: whether it failed on any rank (one small
    collective; the messages travel only then), as rank N's message, or None."""
    world = dist.get_world_size()
    flags = torch.zeros(world, dtype=torch.int64)
    flags[dist.get_rank()] = error is not None
    dist.all_reduce(flags)
    if not bool(flags.any()):
        return None
    errors: list[Any] = [None] * world
    dist.all_gather_object(errors, error)
    failed = [r for r, e in enumerate(errors) if e is not None]
    return f"rank {failed[0]}: {errors[failed[0]]}"


def serve_rank(rank: int, world: int, source: ModelSource, backend: str, vocab_size: int,
               conn: Any, keepalive_s: float) -> None:
    """Run until rank 0 is told to stop (or the launcher stops every rank). Tokens stay
    below ``vocab_size``, the tokenizer's."""
    # Out of the terminal's process group: Ctrl-C (or `timeout`, which signals its whole
    # group) reaches the front end only, which stops the ranks in order. A front end that
    # dies closes the pipe, and the first rank's read fails, ending the others too.
    os.setpgrp()
    if rank != 0:
        # Only the first rank talks to the front end; with this copy closed, the front end
        # reads the end of the pipe as soon as the first rank is gone.
        conn.close()
    model = source.build_staged(backend) if source.stages > 1 else \
        source.build(DistributedComm(backend=backend))
    pids: list[Any] = [None] * world
    dist.all_gather_object(pids, os.getpid())
    if rank != 0:
        while True:
            command, request = _announce(0)
            if command == STOP:
                return
            if request is not None:  # GENERATE (a KEEPALIVE has nothing to do)
                _agree(_generate(model, request, vocab_size))
    conn.send(Ready(pids))
    _first_rank_loop(model, vocab_size, conn, keepalive_s)


def _first_rank_loop(model: Any, vocab_size: int, conn: Any, keepalive_s: float) -> None:
    queue: deque[Generate] = deque()
    cancelled: set[int] = set()
    running: list[int] = []  # the request generating now, if any
    stopping = False

    def read(wait_s: float) -> None:
        nonlocal stopping
        while conn.poll(wait_s):
            wait_s = 0.0
            message = conn.recv()
            if isinstance(message, Generate):
                queue.append(message)
            elif isinstance(message, Cancel):
                # only a request still queued or running: a late cancel of a finished one
                # would stay in the set for good
                if message.request in running or any(q.request == message.request
                                                     for q in queue):
                    cancelled.add(message.request)
            elif isinstance(message, Stop):
                stopping = True

    last_announce = time.monotonic()
    while True:
        if not queue:
            if stopping:
                _announce(STOP)
                return
            if time.monotonic() - last_announce >= keepalive_s:
                _announce(KEEPALIVE)
                last_announce = time.monotonic()
            read(0.2)
            continue
        g = queue.popleft()
        rid = g.request
        if rid in cancelled:
            cancelled.discard(rid)
            conn.send(Done(rid, "cancelled"))
            continue
        try:  # the front end checks these too; a request must never reach the others bad
            check_prompt(model, torch.tensor([g.ids], dtype=torch.int64), g.max_tokens)
            check_sampling(g.temperature, g.top_k, vocab_size)
        except ValueError as exc:
            conn.send(Refused(rid, str(exc)))
            continue
        _, request = _announce(GENERATE, g.ids, g.max_tokens, g.temperature, g.top_k, g.seed)
        assert request is not None
        last_announce = time.monotonic()

        def gone(rid: int = rid) -> bool:
            read(0.0)
            return rid in cancelled

        def report(step: DecodeStep, rid: int = rid) -> None:
            conn.send(Token(rid, step.index, int(step.tokens[0]), step.seconds, step.syncs,
                            step.positions))

        running.append(rid)
        failure = _agree(_generate(model, request, vocab_size, gone, report))
        running.clear()
        if failure is not None:
            conn.send(Fault(rid, failure))
        else:
            conn.send(Done(rid, "cancelled" if rid in cancelled else "length"))
        cancelled.discard(rid)
