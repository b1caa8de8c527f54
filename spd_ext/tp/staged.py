"""Generation with a reduced-sync GPT split by layers over pipeline stages.

Each rank holds one stage's layers (spd_ext.tp.stages), tensor-parallel over its stage's
ranks, with a KV cache for each of its blocks. A step's activations pass stage to stage:
each tensor-parallel rank sends its residual stream (``ResidualStream.to_tensors``: open
regions and pending Ladder all-reduces included) to the same rank of the next stage, as a
header of int64s and the values. The last stage picks the tokens (greedy over its ranks'
slices of the LM head, or its first rank's sample: spd_ext.tp.generation), and one
all-reduce over the replica's ranks gives every stage the tokens, the first rank's stop
flag, every stage's sync count and every rank's failure flag. A stage whose part fails
sends a failure header downstream instead of its activations, so no rank waits for a
message that will not come, and every rank raises StepFailed at that step together.

Greedy output equals ReducedSyncGPT.generate's on the same weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from spd_ext.errors import UsageError
from spd_ext.tp.communicator import TensorParallelComm
from spd_ext.tp.config import GPTConfig
from spd_ext.tp.generation import (
    DecodeStep,
    StepFailed,
    check_prompt,
    check_sampling,
    from_first_rank,
    greedy_over_ranks,
    sample_next,
    samples_greedily,
    token_dtype,
)
from spd_ext.tp.kv_cache import LayerKVCache
from spd_ext.tp.stages import (
    BlockLayer,
    PositionEmbedding,
    StageLayer,
    TokenEmbedding,
    layer_classes,
    partition_by_blocks,
)
from spd_ext.tp.stream import ResidualStream

__all__ = ["StageLinks", "StagedGPT"]

# the header of a stage's message: [kind, number of values, then a stream's layout or a
# plain tensor's shape]
_STREAM, _PLAIN, _FAILED = 1, 2, 3
_HEADER = 2 + 5 + 6 * 4  # ResidualStream.to_tensors' layout: 5 flags and 6 shapes of 4


@dataclass(frozen=True)
class StageLinks:
    """Where this rank's stage sits: its index, the global ranks of the previous and next
    stage at the same tensor-parallel position (None at the ends), and the replica's ranks
    (every stage and shard of this model copy) with their group."""

    stage: int
    stages: int
    prev_rank: int | None
    next_rank: int | None
    replica_ranks: tuple[int, ...]
    replica_group: Any = None  # None: the default group (one replica is the world)

    @classmethod
    def of(cls, rank: int, stages: int, tp: int, replica_ranks: tuple[int, ...],
           replica_group: Any = None) -> StageLinks:
        """For ranks numbered as spd_ext.parallel_dims does (stage slowest, tensor-parallel
        position fastest): ``replica_ranks`` in stage order, ``tp`` per stage."""
        where = replica_ranks.index(rank)
        stage, position = divmod(where, tp)
        prev = replica_ranks[(stage - 1) * tp + position] if stage > 0 else None
        nxt = replica_ranks[(stage + 1) * tp + position] if stage < stages - 1 else None
        return cls(stage, stages, prev, nxt, tuple(replica_ranks), replica_group)


class StagedGPT(nn.Module):
    """This rank's stage of a reduced-sync GPT: ``layers`` (StageLayers in order) and, on
    the last stage, ``head`` (the tied token embedding the LM head reads)."""

    def __init__(self, config: GPTConfig, comm: TensorParallelComm, links: StageLinks,
                 layers: list[StageLayer], head: TokenEmbedding | None = None) -> None:
        super().__init__()
        if (head is None) != (links.stage < links.stages - 1):
            raise UsageError("the last stage, and only it, holds the LM head")
        self.config, self.comm, self.links = config, comm, links
        self.layers = nn.ModuleList(layers)
        self.head = head

    @classmethod
    def from_dense(cls, config: GPTConfig, dense: dict[str, torch.Tensor],
                   comm: TensorParallelComm, links: StageLinks) -> StagedGPT:
        """This rank's stage of ReducedSyncGPT's dense state dict ``dense``, the blocks
        spread evenly over the stages (partition_by_blocks)."""
        classes = layer_classes(config)
        parts = partition_by_blocks(config.n_layer, links.stages)
        own = classes[parts[links.stage]:parts[links.stage + 1]]
        last = links.stage == links.stages - 1
        layers = [cls_(config, comm, **kwargs) for cls_, kwargs in (own[:-1] if last else own)]
        head = None
        if last:  # the head's entry: the tied embedding, whole on this stage too
            head = layers[0] if layers and isinstance(layers[0], TokenEmbedding) else \
                TokenEmbedding(config, comm)
        for module in (*layers, *([head] if head is not None else [])):
            module.load_dense(dense)
        return cls(config, comm, links, layers, head).eval()

    @property
    def sync_counter(self) -> Any:
        return self.comm.counter

    # -- a stage's messages ------------------------------------------------------------
    def _send(self, x: Any) -> None:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        if x is None:
            header[0] = _FAILED
            dist.send(header, self.links.next_rank)
            return
        if isinstance(x, ResidualStream):
            values, layout = x.to_tensors()
            header[0], header[2:2 + layout.numel()] = _STREAM, layout.cpu()
        else:
            values = x
            header[0], header[2:2 + x.dim()] = _PLAIN, torch.tensor(x.shape)
        header[1] = values.numel()
        dist.send(header, self.links.next_rank)
        dist.send(values.contiguous(), self.links.next_rank)

    def _receive(self, dtype: torch.dtype, device: torch.device) -> Any:
        """The previous stage's message; None if it failed."""
        header = torch.zeros(_HEADER, dtype=torch.int64)
        dist.recv(header, self.links.prev_rank)
        kind, count = int(header[0]), int(header[1])
        if kind == _FAILED:
            return None
        values = torch.empty(count, dtype=dtype, device=device)
        dist.recv(values, self.links.prev_rank)
        if kind == _STREAM:
            layout = header[2:2 + _HEADER - 2].to(device)
            return ResidualStream.from_tensors((values, layout), self.comm)
        shape = [d for d in header[2:6].tolist() if d > 0]
        return values.view(shape)

    # -- generation -----------------------------------------------------------------------
    def _run_stage(self, x: Any, start: int, caches: list[LayerKVCache]) -> Any:
        blocks = iter(caches)
        for layer in self.layers:
            if isinstance(layer, PositionEmbedding):
                x = layer(x, start)
            elif isinstance(layer, BlockLayer):
                x = layer(x, next(blocks))
            else:
                x = layer(x)
        return x

    @torch.no_grad()
    def generate_steps(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, seed: int | None = None,
                       should_stop: Callable[[], bool] | None = None,
                       vocab_size: int | None = None) -> Iterator[DecodeStep]:
        """As ReducedSyncGPT.generate_steps, every rank of the replica iterating together
        (each with the prompt); a step's ``syncs`` are every stage's."""
        check_prompt(self, idx, max_new_tokens)
        vocab = self.config.vocab_size if vocab_size is None else vocab_size
        if not 1 <= vocab <= self.config.vocab_size:
            raise UsageError(f"vocab_size must be in [1, {self.config.vocab_size}], got {vocab}")
        check_sampling(temperature, top_k, vocab)
        if max_new_tokens == 0:
            return
        links, comm = self.links, self.comm
        batch, device = idx.size(0), idx.device
        dtype = next(self.parameters()).dtype
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        max_len = idx.size(1) + max_new_tokens - 1
        caches = [LayerKVCache(comm.shards * batch, layer.block.attn.local_heads, max_len,
                               layer.block.attn.head_dim, dtype, device)
                  for layer in self.layers if isinstance(layer, BlockLayer)]
        replica = len(links.replica_ranks)
        me = links.replica_ranks.index(dist.get_rank())
        message_dtype = token_dtype(vocab)
        counter = comm.counter
        kept = (counter.blocks, counter.grad_syncs)
        counter.reset()
        inputs, start_pos = idx, 0
        try:
            for i in range(max_new_tokens):
                started = time.perf_counter()
                stop = (should_stop is not None and me == 0 and i + 1 < max_new_tokens
                        and should_stop())
                tokens, failure = self._stage_step(inputs, start_pos, caches, vocab,
                                                   temperature, top_k, generator, device)
                syncs = counter.step()["forward"]
                # one message for the replica: tokens (the last stage's first rank), the
                # first rank's stop flag, every stage's syncs, every rank's failure flag
                message = torch.zeros(batch + 2 + replica, dtype=message_dtype, device=device)
                if tokens is not None and links.stage == links.stages - 1 and comm.rank == 0:
                    message[:batch] = tokens.to(message_dtype)
                message[batch] = float(stop)
                if comm.rank == 0:
                    message[batch + 1] = syncs
                message[batch + 2 + me] = float(failure is not None)
                dist.all_reduce(message, group=links.replica_group)
                failed = [links.replica_ranks[r] for r, flag in
                          enumerate(message[batch + 2:].tolist()) if flag]
                if failed:
                    if failure is not None:
                        raise StepFailed(f"{type(failure).__name__}: {failure}".splitlines()[0],
                                         failed, here=True) from failure
                    raise StepFailed(f"rank {failed[0]} failed its part of the step (its error "
                                     "is its own)", failed, here=False)
                tokens = message[:batch].long()
                yield DecodeStep(i, tokens, inputs.size(1), int(message[batch + 1]),
                                 time.perf_counter() - started)
                if bool(message[batch]):
                    return
                start_pos += inputs.size(1)
                inputs = tokens[:, None]
        finally:
            counter.blocks, counter.grad_syncs = kept

    def _stage_step(self, inputs: torch.Tensor, start: int, caches: list[LayerKVCache],
                    vocab: int, temperature: float, top_k: int | None,
                    generator: torch.Generator | None, device: torch.device
                    ) -> tuple[torch.Tensor | None, Exception | None]:
        """This stage's part of one step: (the tokens on the last stage, this rank's
        failure). A failure upstream or here is passed downstream as a failure header."""
        links = self.links
        last = links.stage == links.stages - 1
        failure: Exception | None = None
        x: Any = inputs
        if links.stage > 0:
            x = self._receive(next(self.parameters()).dtype, device)
        if x is not None:
            try:
                x = self._run_stage(x, start, caches)
            except Exception as exc:  # noqa: BLE001 - told to every rank with the step
                failure, x = exc, None
        if not last:
            self._send(x)
            return None, failure
        if x is None:  # failed here or upstream: the replica's message says where
            return None, failure
        head = self.head
        assert head is not None
        return self._pick(x[:, -1, :], head.weight[:vocab], temperature, top_k, generator,
                          failure)

    def _pick(self, hidden: torch.Tensor, head: torch.Tensor, temperature: float,
              top_k: int | None, generator: torch.Generator | None,
              failure: Exception | None) -> tuple[torch.Tensor | None, Exception | None]:
        comm = self.comm
        try:
            if comm.emulated:
                return sample_next(F.linear(hidden, head), temperature, top_k,
                                   generator), failure
            if samples_greedily(temperature):
                return greedy_over_ranks(comm, hidden, head, False)[0], failure
            tokens, _ = from_first_rank(
                comm, lambda: sample_next(F.linear(hidden, head), temperature, top_k,
                                          generator), hidden.size(0), head.size(0),
                hidden.device, False)
            return tokens, failure
        except StepFailed as exc:  # a last-stage rank's sampling failed: the replica hears
            return None, exc

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None) -> torch.Tensor:
        """``idx`` followed by ``max_new_tokens`` tokens, on every rank of the replica."""
        new = [step.tokens[:, None] for step in
               self.generate_steps(idx, max_new_tokens, temperature, top_k, seed)]
        return torch.cat([idx, *new], dim=1)

