"""The parameter server's wire protocol: the messages, and how they travel over a
:class:`Link` (one worker <-> one server channel).

Two transports carry it: fixed torch.distributed process groups (``PSProcessGroups``:
worker -> server on one group, read by a receiver thread with any-source receives,
server -> worker on another, so sends and receives never share a gloo context), or, for
elastic jobs, one torchft session per worker and server (``PSSessions``). Every message
starts with a header of ``HEADER`` int64s:

- worker -> server: ``PUSH`` / ``PULL`` / ``DONE``, the worker's step, the version of the
  weights the step was computed on (a push), unused; a push is followed by its gradient
  shard, float32 or 8-bit block-quantized (int8 values, then one float32 scale per block).
  Elastic jobs open each session with ``HELLO``, the worker id asked for (-1: let server 0
  choose), the worker's pid, 1 if it joins a running job (it starts where the others are).
- server -> worker, answering a pull: ``OK``, the step the worker is to compute, the
  version of the weights, unused; then the weights of the server's shard. Answering a
  hello: ``OK``, the step the worker starts at, the version, the worker's id. Or
  ``STOP``, the culprit (the worker that exited or stalled, -1 when unknown), why (one of
  ``STOP_REASONS``), unused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from spd_ext.ops.quantize import QuantizedTensor, dequantize_blockwise, quantize_blockwise

PUSH, PULL, DONE, HELLO = 1, 2, 3, 4
OK, STOP = 0, 1
# why a STOP reply names its culprit
EXITED, STALLED, DROPPED, TOO_FEW, TAKEN = 0, 1, 2, 3, 4
HEADER = 4  # int64: kind, worker step, version, extra; STOP: STOP, culprit, why, (unused)


class ServerStopped(RuntimeError):
    """The parameter server ended the job (a worker died or stalled), or this worker."""


def header(kind: int, step: int, version: int, extra: int = 0) -> torch.Tensor:
    return torch.tensor([kind, step, version, extra], dtype=torch.int64)


class Link(Protocol):
    """One worker <-> server channel: blocking point-to-point sends and receives."""

    def send(self, tensor: torch.Tensor) -> None: ...

    def recv(self, tensor: torch.Tensor) -> None: ...


@dataclass
class GroupLink:
    """A peer over fixed process groups: sends on one group, receives on the other."""

    peer: int
    send_group: Any
    recv_group: Any

    def send(self, tensor: torch.Tensor) -> None:
        dist.send(tensor, dst=self.peer, group=self.send_group)

    def recv(self, tensor: torch.Tensor) -> None:
        dist.recv(tensor, src=self.peer, group=self.recv_group)


@dataclass(eq=False)  # compared by identity: a message is one event, not a value
class Message:
    source: int
    kind: int
    step: int
    version: int
    grad: torch.Tensor | None = None
    extra: int = 0
    session: Any = None  # elastic jobs: the session it came on (replies go back on it)


def receive_any(group: Any, reply_group: Any, numel: int, block_size: int | None) -> Message:
    """The next worker -> server message on fixed groups, from any worker, with its
    gradient (``numel`` elements; 8-bit blocks of ``block_size`` when quantized, None:
    float32) if a push."""
    head = torch.empty(HEADER, dtype=torch.int64)
    # recv from any source returns the sender's global rank (the groups span every rank,
    # in order, so it is also its rank in ``group``)
    source = dist.recv(head, src=None, group=group)
    return read_body(head, source, GroupLink(source, reply_group, group), numel, block_size)


def read_body(head: torch.Tensor, source: int, link: Link, numel: int,
              block_size: int | None) -> Message:
    """The message that ``head`` starts, with its gradient read from ``link`` if a push."""
    kind, step, version, extra = (int(v) for v in head)
    grad = receive_gradient(link, numel, block_size) if kind == PUSH else None
    return Message(source, kind, step, version, grad, extra)


def send_gradient(grad: torch.Tensor, link: Link, block_size: int | None) -> None:
    """The body of a push: ``grad`` as float32, or 8-bit in blocks of ``block_size``."""
    if block_size is not None:
        q = quantize_blockwise(grad, block_size)
        link.send(q.values)
        link.send(q.scales)
    else:
        link.send(grad)


def receive_gradient(link: Link, numel: int, block_size: int | None) -> torch.Tensor:
    """What :func:`send_gradient` sent, as float32."""
    if block_size is not None:
        nblocks = -(-numel // block_size)
        values = torch.empty(numel, dtype=torch.int8)
        scales = torch.empty(nblocks, dtype=torch.float32)
        link.recv(values)
        link.recv(scales)
        return dequantize_blockwise(QuantizedTensor(values, scales, torch.Size([numel]),
                                                    torch.float32, block_size))
    grad = torch.empty(numel, dtype=torch.float32)
    link.recv(grad)
    return grad


def stop_reason(culprit: int, why: int, dead_timeout: float) -> str:
    """What a worker's STOP reply says, in words."""
    if why == TOO_FEW:
        return "fewer workers than the job's min_workers remain (see the server's log)"
    if why == TAKEN:
        return f"worker id {culprit} is already in use; join with another id (or none)"
    if why == DROPPED:
        return (f"this worker (id {culprit}) was dropped from the job after sending "
                f"nothing for {dead_timeout:g} s")
    if culprit < 0:
        return "another worker died or stalled; see that rank's error"
    if why == EXITED:
        return f"worker rank {culprit} exited"
    return f"worker rank {culprit} sent nothing for {dead_timeout:g} s"
