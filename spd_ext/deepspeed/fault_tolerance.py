"""Fault-tolerant DiLoCo islands: each island its own DeepSpeed job, the outer step across
the islands alive, through torchft.

Each rank of an island runs a torchft ``Manager`` (the island is torchft's replica group,
the rank its group rank) with a reconfigurable gloo group that joins it to the same rank
of every other island, which holds the same ZeRO partition. At each outer step (every H
inner steps) the island's ranks:

1. ask the lighthouse for a quorum (``start_quorum``): the islands alive; an island that
   died is left out once its heartbeat stops, one that (re)starts is let in, and if it is
   behind it first *heals*: each of its ranks fetches the state of the same rank of a live
   island (anchor, outer momentum, its inner optimizer partition, step counters);
2. sum ``c * (anchor - theta)`` and ``c`` over the quorum (one all-reduce), where ``c`` is
   the island's weight if it trained since the last outer step (1, or with
   ``island_weights: loss`` exp(-L/T) of its mean training loss L since then) and 0 for
   one that just healed, so the pseudo-gradient is the weighted mean over the islands
   that trained: the weights renormalize over the islands present;
3. vote (``should_commit``): only if every rank of every island got the sum is the outer
   step applied; a failure during the step (an island killed mid-all-reduce) votes it
   down everywhere, and the step is retried with the islands then alive, from the same
   local weights (the all-reduce runs on a copy), up to ``retries`` times.

A healed island's parameters equal the others' after its first outer step: it applies
the same outer step to the same anchor and momentum. The lighthouse itself is the single
point of failure (as torchft says): if it goes, the islands stop at their next quorum.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from spd_ext.deepspeed.config import FaultToleranceConfig, SpdExtConfigError
from spd_ext.utils.optional import import_torchft

WHERE = "spd_ext.fault_tolerance"


class OuterStepFailed(RuntimeError):
    """The islands voted an outer step down more often in a row than allowed."""


def check_lighthouse(url: str, timeout_s: float = 10.0, where: str = f"{WHERE}.lighthouse"
                     ) -> None:
    """Refuse, naming it, a lighthouse that does not answer (before any quorum waits on it)."""
    import socket

    host, _, port = url.removeprefix("http://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise SpdExtConfigError(
            f"{where} {url}: no torchft lighthouse answers there "
            f"({exc.strerror or exc}); start one (`torchft_lighthouse --min_replicas 1 "
            f"--bind [::]:{port}`) or fix the address") from None


class FaultTolerantIslandDiLoCo:
    """The outer step of one rank of a fault-tolerant island (see the module docstring).
    Built by ``EngineIntegration`` on an engine whose "spd_ext" section has
    ``fault_tolerance``; ``join()`` runs once before training (it heals a restarted
    island), ``after_step`` every step."""

    def __init__(self, island_diloco: Any, engine: Any, integration: Any,
                 cfg: FaultToleranceConfig) -> None:
        import_torchft(WHERE)
        self.inner = island_diloco  # IslandDiLoCo: the anchor, outer optimizer, partitions
        self.engine, self.integration, self.cfg = engine, integration, cfg
        self.island = cfg.resolved_island()
        self.lighthouse = cfg.resolved_lighthouse(WHERE)
        if dist.get_rank() == 0:
            check_lighthouse(self.lighthouse)
        logging.getLogger("torchft").setLevel(logging.ERROR)  # spd_ext reports failures
        self._manager: Any = None
        self._healed = False
        self._loss_sum: torch.Tensor | None = None  # island_weights loss: since the outer step
        self._loss_steps = 0
        self.island_loss: float | None = None  # the island's mean loss at the last outer step
        self.island_weight: float | None = None  # its normalized weight in that step
        self.islands_present = 0
        self.voted_down = 0  # outer steps voted down (and retried) so far
        self.healed_at: int | None = None  # the step this island healed to, if it did

    @property
    def manager(self) -> Any:
        """This rank's torchft Manager, started on first use (``join``): its heartbeats
        tell the lighthouse this island is alive, and the lighthouse holds the other
        islands' quorums for an island that heartbeats but has not asked for one yet; a
        restarted island starting it early would hold them for its whole start-up."""
        if self._manager is None:
            import torchft
            from torchft.process_group import ProcessGroupGloo

            cfg = self.cfg
            timeout = timedelta(seconds=cfg.timeout_s)
            self._manager = torchft.Manager(
                pg=ProcessGroupGloo(timeout=timeout), load_state_dict=None, state_dict=None,
                min_replica_size=cfg.min_islands,
                use_async_quorum=False,  # heal before the outer step, never during inner ones
                init_sync=False,  # every island starts from the same seeded weights
                timeout=timeout, quorum_timeout=timedelta(seconds=cfg.quorum_timeout_s),
                connect_timeout=timeout, rank=dist.get_rank(),
                world_size=dist.get_world_size(), store_addr=os.environ["MASTER_ADDR"],
                store_port=int(os.environ["MASTER_PORT"]), lighthouse_addr=self.lighthouse,
                replica_id=f"island{self.island}")
            self._manager.register_state_dict_fn("spd_ext", self._load_healing_state,
                                                 self._healing_state)
        return self._manager

    @property
    def metrics(self) -> Any:
        return self.inner.metrics

    # -- healing ------------------------------------------------------------------------
    def _healing_state(self) -> dict:
        """What a healing island fetches from this rank: taken at the quorum, before the
        outer step, so it holds the anchor and momentum that step starts from."""
        engine = self.engine
        return {"anchor": [a.detach().clone() for a in self.inner.anchor],
                "outer": self.inner.outer.state_dict(),
                "inner": engine.optimizer.optimizer.state_dict(),
                "global_steps": engine.global_steps, "global_samples": engine.global_samples,
                "micro_steps": engine.micro_steps,
                "applied_steps": self.integration.applied_steps}

    def _load_healing_state(self, state: dict) -> None:
        engine, inner = self.engine, self.inner
        with torch.no_grad():
            for a, w, saved in zip(inner.anchor, inner.weights(engine.module), state["anchor"]):
                a.copy_(saved)
                w.copy_(saved)
        inner.outer.load_state_dict(state["outer"])
        engine.optimizer.optimizer.load_state_dict(state["inner"])
        engine.global_steps = int(state["global_steps"])
        engine.global_samples = int(state["global_samples"])
        engine.micro_steps = int(state["micro_steps"])
        self.integration.applied_steps = int(state["applied_steps"])
        self._healed = True
        self.healed_at = engine.global_steps

    # -- the outer step -----------------------------------------------------------------
    def join(self, wait_for_all: bool = True) -> int:
        """Before training: join the islands alive (healing from one if they are ahead,
        and taking part in the outer step they are at without a pseudo-gradient of its
        own). On a fresh start with ``islands`` expected (and ``wait_for_all``), empty
        outer steps repeat until that many have joined (an island that comes later heals
        from the others' untrained state, which is its own), so the islands all train
        from the first step. Returns the step to train from."""
        deadline = time.monotonic() + self.cfg.quorum_timeout_s
        self._outer_step(step=None)
        expected = (self.cfg.islands or 0) if wait_for_all else 0
        while (self.engine.global_steps == 0 and self.islands_present < expected
               and time.monotonic() < deadline):
            time.sleep(0.2)
            self._outer_step(step=None)
        return self.engine.global_steps

    def after_step(self, model: Any, step: int) -> None:
        H = self.inner.H
        loss = self.integration.last_loss()
        if self.cfg.island_weights == "loss" and loss is not None:
            # kept on the device: read once per outer step, not per step
            loss = loss.detach().double()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_steps += 1
        if (step + 1) % H != 0:
            self.inner.metrics.record_staleness((step + 1) % H)
            return
        self._outer_step(step)
        self.inner.metrics.record_staleness(H)

    def _island_score(self) -> float:
        """This island's unnormalized weight: 1, or exp(-L/T) with L its mean training
        loss since the last outer step over all its ranks (collective inside the island)."""
        if self.cfg.island_weights == "uniform":
            return 1.0
        group = self.integration.dp_group
        mean = torch.zeros(2, dtype=torch.float64)
        if self._loss_sum is not None:
            mean[0], mean[1] = self._loss_sum.detach().cpu(), self._loss_steps
        dist.all_reduce(mean, group=group)  # every rank's sum and count: the island's mean
        self._loss_sum, self._loss_steps = None, 0
        if mean[1] == 0 or not math.isfinite(float(mean[0])):
            return 1.0  # no loss seen (non-finite ones are refused before the update)
        self.island_loss = float(mean[0] / mean[1])
        # capped so that islands with huge losses still weigh (alike) instead of all 0
        return math.exp(-min(self.island_loss / self.cfg.temperature, 80.0))

    def _outer_step(self, step: int | None) -> None:
        manager, inner = self.manager, self.inner
        weights = inner.weights(self.engine.module)
        # before the quorum: every rank of the island takes part, healed or not
        score = self._island_score() if step is not None else 0.0
        for attempt in range(self.cfg.retries + 1):
            self._healed = False
            try:
                manager.start_quorum()  # heals this island first if it is behind
            except Exception as exc:  # noqa: BLE001 - torchft raises the RPC's own types
                raise OuterStepFailed(
                    f"island {self.island}: no quorum of islands at step "
                    f"{self.engine.global_steps} within {WHERE}.quorum_timeout_s "
                    f"{self.cfg.quorum_timeout_s:g} s ({' '.join(str(exc).split())[:200]}); "
                    "the lighthouse or the other islands stopped answering, or an inner "
                    "phase takes longer than the timeout: raise quorum_timeout_s") from None
            trained = step is not None and not self._healed
            c = score if trained else 0.0
            with torch.no_grad():
                flat = torch.cat([(a - w).reshape(-1).float() * c
                                  for a, w in zip(inner.anchor, weights)] +
                                 [torch.tensor([c], dtype=torch.float32, device=weights[0].device)])
            manager.allreduce(flat, reduce_op=dist.ReduceOp.SUM).wait()
            if manager.should_commit():
                self.islands_present = manager.num_participants()
                total = float(flat[-1])
                self.island_weight = c / total if total > 0 else 0.0
                self._apply(flat, weights)
                return
            self.voted_down += 1
            if dist.get_rank() == 0:
                print(f"spd_ext: island {self.island}: the outer step at step "
                      f"{self.engine.global_steps} was voted down ({_failure(manager)}); "
                      f"retrying with the islands alive ({attempt + 1}/{self.cfg.retries})",
                      file=sys.stderr, flush=True)
        raise OuterStepFailed(
            f"island {self.island}: the outer step at step {self.engine.global_steps} was "
            f"voted down {self.cfg.retries + 1} times in a row; the islands cannot agree (see "
            f"the messages above); raise {WHERE}.retries or check the islands' network")

    def _apply(self, flat: torch.Tensor, weights: list[torch.Tensor]) -> None:
        inner = self.inner
        total = float(flat[-1])
        with torch.no_grad():
            if total > 0:  # no island trained (the first join): nothing to step
                offset = 0
                for a in inner.anchor:
                    n = a.numel()
                    a.grad = (flat[offset:offset + n] / total).view_as(a).to(a.dtype)
                    offset += n
                inner.outer.step()
            for a, w in zip(inner.anchor, weights):
                w.copy_(a)
        inner.refresh_low_precision()

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "torchft": self.manager.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
        if "torchft" in state:
            self.manager.load_state_dict(state["torchft"])

    def close(self) -> None:
        if self._manager is not None:
            self._manager.shutdown(wait=False)


def _failure(manager: Any) -> str:
    """What failed in an outer step, in one line."""
    err = manager.errored()
    if err is None:
        return "a rank of another island failed in it"
    exc = getattr(err, "original_exception", err)
    text = " ".join(str(exc).split())
    return f"this island's all-reduce failed: {type(exc).__name__}: {text[:200]}"
