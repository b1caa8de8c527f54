"""What ``spd_ext.train.Trainer`` calls on its hooks.

Data-parallel aggregators (``spd_ext.dp``) and staleness strategies (``spd_ext.staleness``)
plug into the Trainer through these five calls (a module of its own, below both, so that
they can derive from it without importing the trainer). Each is a no-op here, so a hook class
derives from :class:`TrainerHooks` and overrides only what it needs; the Trainer calls
them without probing: the first three every step, ``evaluation_weights`` at each evaluation,
``finish`` once at the end.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

#: The calls: a step's three in order, then the evaluation's and the end's.
HOOK_METHODS = ("before_step", "after_backward", "after_step", "evaluation_weights", "finish")


@runtime_checkable
class TrainerHooks(Protocol):
    """The Trainer's hooks. Derive from it (the defaults do nothing) or implement all five."""

    def before_step(self, step: int) -> None:
        """Before the step's forward (e.g. a straggler's delay)."""

    def after_backward(self, model: nn.Module, step: int, loss: float) -> dict | None:
        """Between backward and the optimizer, where gradients are exchanged. The dict is
        logged with the step; ``{"skip_optimizer": True}`` skips this step's update."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """After the optimizer's update (e.g. parameter averaging)."""

    def evaluation_weights(self, model: nn.Module) -> list[torch.Tensor] | None:
        """The weights to evaluate (collective on every rank; the model is left alone), or
        None for the model's own."""
        return None

    def finish(self, model: nn.Module) -> None:
        """At the end: wait for collectives still in flight, so every rank exits cleanly."""


class NoHooks(TrainerHooks):
    """The Trainer without hooks."""


def check_hooks(hooks: object) -> TrainerHooks:
    """``hooks`` as the Trainer uses it; a TypeError naming what is missing otherwise."""
    if hooks is None:
        return NoHooks()
    if not isinstance(hooks, TrainerHooks):
        missing = [m for m in HOOK_METHODS if not callable(getattr(hooks, m, None))]
        raise TypeError(f"Trainer hooks {type(hooks).__name__} lack {', '.join(missing)}; "
                        "derive the class from spd_ext.train.TrainerHooks, whose methods do "
                        "nothing by default")
    return hooks
