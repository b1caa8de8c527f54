"""Counts every tensor-parallel all-reduce as it happens: forward and backward, per block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class SyncCounts:
    forward: int = 0
    backward: int = 0


@dataclass
class SyncCounter:
    """Live counts of the current step, by label (block ``"3:spd"``, ``"final"``, ...).

    The model sets the label around each block. A forward all-reduce is charged to the
    block that closes its region; the backward one to the block that opened the region
    (where the stream was copied into it), however late backward runs. ``step()``
    returns the step's counts and starts the next step at zero.
    """

    blocks: dict[str, SyncCounts] = field(default_factory=dict)
    label: str = "model"
    grad_syncs: int = 0  # bucketed all-reduces of partial parameter gradients

    @contextmanager
    def scope(self, label: str) -> Iterator[None]:
        previous, self.label = self.label, label
        try:
            yield
        finally:
            self.label = previous

    def count_forward(self, label: str) -> None:
        self.blocks.setdefault(label, SyncCounts()).forward += 1

    def count_backward(self, label: str) -> None:
        self.blocks.setdefault(label, SyncCounts()).backward += 1

    @property
    def forward(self) -> int:
        return sum(c.forward for c in self.blocks.values())

    @property
    def backward(self) -> int:
        return sum(c.backward for c in self.blocks.values())

    def snapshot(self) -> dict:
        return {"forward": self.forward, "backward": self.backward,
                "grad_syncs": self.grad_syncs,
                "blocks": {k: (c.forward, c.backward) for k, c in self.blocks.items()}}

    def reset(self) -> None:
        self.blocks = {}
        self.grad_syncs = 0

    def step(self) -> dict:
        """This step's counts; the counter starts the next step at zero."""
        snap = self.snapshot()
        self.reset()
        return snap
