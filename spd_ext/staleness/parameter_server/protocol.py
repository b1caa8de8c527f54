"""The parameter server's wire protocol, on torch.distributed point-to-point (no raw sockets).

Messages: worker -> server on one process group (read by a receiver thread with
any-source receives), server -> worker on another (the server's main thread), so sends
and receives never share a gloo context. Every message starts with a header of
``HEADER`` int64s:

- worker -> server: ``PUSH`` / ``PULL`` / ``DONE``, the worker's step, the version of the
  weights the step was computed on (a push), unused; a push is followed by its gradient
  shard, float32 or 8-bit block-quantized (int8 values, then one float32 scale per block).
- server -> worker, answering a pull: ``OK``, the step the worker is to compute, the
  version of the weights, unused; then the weights of the server's shard. Or ``STOP``, the
  culprit (the worker that exited or stalled, -1 when unknown), why (``EXITED`` /
  ``STALLED``), unused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from spd_ext.ops.quantize import QuantizedTensor, dequantize_blockwise, quantize_blockwise

PUSH, PULL, DONE = 1, 2, 3
OK, STOP = 0, 1
EXITED, STALLED = 0, 1  # why a STOP reply names its culprit
HEADER = 4  # int64: kind, worker step, version, (unused); STOP: STOP, culprit, why, (unused)


class ServerStopped(RuntimeError):
    """The parameter server ended the job (a worker died or stalled)."""


def header(kind: int, step: int, version: int) -> torch.Tensor:
    return torch.tensor([kind, step, version, 0], dtype=torch.int64)


@dataclass(eq=False)  # compared by identity: a message is one event, not a value
class Message:
    source: int
    kind: int
    step: int
    version: int
    grad: torch.Tensor | None = None


def receive_message(group: Any, numel: int, block_size: int | None) -> Message:
    """The next worker -> server message from any worker, with its gradient (``numel``
    elements; 8-bit blocks of ``block_size`` when quantized, None: float32) if a push."""
    head = torch.empty(HEADER, dtype=torch.int64)
    # recv from any source returns the sender's global rank (the groups span every rank,
    # in order, so it is also its rank in ``group``)
    source = dist.recv(head, src=None, group=group)
    kind, step, version = (int(v) for v in head[:3])
    grad = receive_gradient(source, group, numel, block_size) if kind == PUSH else None
    return Message(source, kind, step, version, grad)


def send_gradient(grad: torch.Tensor, dst: int, group: Any, block_size: int | None) -> None:
    """The body of a push: ``grad`` as float32, or 8-bit in blocks of ``block_size``."""
    if block_size is not None:
        q = quantize_blockwise(grad, block_size)
        dist.send(q.values, dst=dst, group=group)
        dist.send(q.scales, dst=dst, group=group)
    else:
        dist.send(grad, dst=dst, group=group)


def receive_gradient(source: int, group: Any, numel: int,
                     block_size: int | None) -> torch.Tensor:
    """What :func:`send_gradient` sent, as float32."""
    if block_size is not None:
        nblocks = -(-numel // block_size)
        values = torch.empty(numel, dtype=torch.int8)
        scales = torch.empty(nblocks, dtype=torch.float32)
        dist.recv(values, src=source, group=group)
        dist.recv(scales, src=source, group=group)
        return dequantize_blockwise(QuantizedTensor(values, scales, torch.Size([numel]),
                                                    torch.float32, block_size))
    grad = torch.empty(numel, dtype=torch.float32)
    dist.recv(grad, src=source, group=group)
    return grad
