"""A DDP communication hook that reduces each bucket as sum_i w_i g_i.

    state = SignalWeightingState(SignalWeightedAggregator("loss_ema", "softmax"))
    ddp.register_comm_hook(state, signal_weighted_hook)
    for step ...:
        loss = ddp(x, y)
        state.begin_step(loss.item())     # collective: the step's weights (before backward)
        loss.backward()                   # the hook reduces every bucket with them
        state.end_step()
        opt.step()

The weights must exist before the first bucket is ready, hence ``begin_step``; gradient
signals see the buckets as they pass (before reduction) and count from the next step.
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations at run
# time against dist.GradBucket and torch.futures.Future[torch.Tensor].
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spd_ext.comm import all_reduce
from spd_ext.dp.aggregator import SignalWeightedAggregator


@dataclass
class SignalWeightingState:
    aggregator: SignalWeightedAggregator
    step: int = 0
    weights: list[float] | None = None

    def begin_step(self, loss: float) -> list[float]:
        self.weights = self.aggregator.compute_weights(self.step, loss)
        self.aggregator.signal.begin_gradient()
        return self.weights

    def end_step(self) -> None:
        if self.weights is None:
            raise RuntimeError("end_step() without begin_step()")
        self.aggregator.signal.end_gradient()
        self.weights = None
        self.step += 1


def signal_weighted_hook(state: SignalWeightingState,
                         bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    if state.weights is None:
        raise RuntimeError("signal_weighted_hook: call state.begin_step(loss) before "
                           "loss.backward() so that every rank knows this step's weights")
    agg = state.aggregator
    buffer = bucket.buffer()
    agg.observe_local_piece(bucket.index(), buffer)
    index = bucket.index()
    work = all_reduce(buffer, "weighted", weight=state.weights[agg.rank], group=agg.group,
                      async_op=True)  # overlaps the rest of backward

    def remember(reduced: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        agg.remember_global_piece(index, reduced.value())
        return reduced.value()

    return work.get_future().then(remember)
