"""KV-cached text generation with a ReducedSyncGPT, emulated or distributed.

The prompt is prefilled in one forward; then each step feeds one token per sequence,
reading every earlier position from the KV cache. Only the last position goes through the
LM head. Every rank of a tensor-parallel group runs the same steps and must use the same
token:

- sampling (temperature > 0): every rank computes the full logits; the group's first
  rank's sample is the one every rank uses (one small message), so the ranks never
  diverge over a tie or a rounding difference;
- greedy decoding on several ranks: the LM head is split over the vocabulary (each rank
  multiplies its slice of the rows, the head being the largest replicated cost of a
  decoded token), and the same message carries each rank's best (logit, token); every
  rank then takes the largest, the lowest token id on a tie, as argmax over the whole
  vocabulary does.

The same message carries each rank's failure flag: a rank whose own part of a step fails
(NaN probabilities from a broken model, ...) says so instead of leaving the others waiting
in the all-reduce, and every rank raises :class:`StepFailed` at that step together, so a
caller that serves requests can fail the one request and go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from spd_ext.errors import UsageError
from spd_ext.tp.communicator import TensorParallelComm

if TYPE_CHECKING:
    from spd_ext.tp.model import ReducedSyncGPT


@dataclass
class DecodeStep:
    """One forward of generation: the prefill (``index`` 0) or one decoded token."""

    index: int
    tokens: torch.Tensor  # [B] the token chosen for each sequence
    positions: int  # positions this forward processed per sequence (prompt length, then 1)
    syncs: int  # forward tensor-parallel all-reduces of this forward
    seconds: float  # wall time of the forward and the sampling, token on the host


class StepFailed(RuntimeError):
    """A step of distributed generation failed on ``ranks``; every rank of the group raises
    it at the same step (the group stays in lock step and usable). On a failed rank it is
    raised from the rank's own exception (``here``)."""

    def __init__(self, message: str, ranks: list[int], here: bool) -> None:
        super().__init__(message)
        self.ranks, self.here = ranks, here


def samples_greedily(temperature: float) -> bool:
    """Whether ``temperature`` picks the largest logit: 0, or too small for float32 (below
    its smallest normal number, 1.2e-38), where ``logits / temperature`` is 0 / 0 (NaN)
    and sampling would be greedy anyway."""
    return temperature < torch.finfo(torch.float32).tiny


def check_sampling(temperature: float, top_k: int | None, vocab_size: int) -> None:
    if not (isinstance(temperature, (int, float)) and temperature >= 0.0
            and temperature == temperature and temperature != float("inf")):
        raise UsageError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                         f"{temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= vocab_size):
        raise UsageError(f"top_k must be None or an integer in [1, {vocab_size}], got {top_k!r}")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] tokens: argmax at temperature 0 (or one too small for float32),
    else softmax sampling of logits / temperature restricted to the ``top_k`` largest."""
    logits = logits.float()
    if samples_greedily(temperature):
        return logits.argmax(-1)
    # shifted so the largest is 0: a tiny temperature then gives -inf, never inf / inf (NaN)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


def check_prompt(model: ReducedSyncGPT, idx: torch.Tensor, max_new_tokens: int) -> None:
    cfg = model.config
    if idx.dim() != 2 or idx.dtype != torch.long or idx.numel() == 0:
        raise UsageError(f"idx must be a non-empty [batch, tokens] int64 tensor, got "
                         f"{tuple(idx.shape)} {idx.dtype}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise UsageError(f"token id {lo if lo < 0 else hi} is outside the vocabulary "
                         f"[0, {cfg.vocab_size})")
    room = max(new_tokens_that_fit(idx.size(1), cfg.block_size), 0)
    if room == 0 or max_new_tokens > room:
        raise UsageError(f"{idx.size(1)} prompt tokens + {max_new_tokens} new ones exceed the "
                         f"model's context of {cfg.block_size} positions (the last new token "
                         f"is not fed back: at most {room} fit); shorten the prompt or ask for "
                         "fewer tokens")


def new_tokens_that_fit(prompt_len: int, context: int) -> int:
    """How many tokens generation can add to a prompt of ``prompt_len`` in a context of
    ``context`` positions: every new token but the last is fed back, so the cache holds
    ``prompt_len + new - 1`` positions (a prompt that fills the context still gets one)."""
    return context - prompt_len + 1


def vocab_slice(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows of the LM head rank ``rank`` multiplies in greedy decoding."""
    per_rank = -(-vocab_size // world_size)
    return min(vocab_size, rank * per_rank), min(vocab_size, (rank + 1) * per_rank)


def _exchange(comm: TensorParallelComm, local: Callable[[], torch.Tensor],
              shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              stop: bool) -> tuple[torch.Tensor, bool]:
    """Sum every rank's message (``local()``, zeros where the other ranks fill in) in one
    all-reduce, the model's own, with the first rank's stop flag and one failure flag per
    rank. A rank whose ``local()`` raises sends zeros and its flag; then every rank raises
    StepFailed here, together, rather than the others waiting for it in the all-reduce."""
    world = comm.tp_size
    failure: Exception | None = None
    try:
        message = local()
    except Exception as exc:  # noqa: BLE001 - told to every rank, raised below on all
        failure, message = exc, torch.zeros(shape, dtype=dtype, device=device)
    flags = torch.zeros(world + 1, dtype=dtype, device=device)
    flags[comm.rank] = float(failure is not None)
    if comm.rank == 0:
        flags[-1] = float(stop)
    flat = torch.cat([message.reshape(-1), flags])
    comm.all_reduce_(flat)
    failed = [r for r, flag in enumerate(flat[-world - 1:-1].tolist()) if flag]
    if failed:
        if failure is not None:
            raise StepFailed(f"{type(failure).__name__}: {failure}".splitlines()[0], failed,
                             here=True) from failure
        raise StepFailed(f"rank {failed[0]} failed its part of the step (its error is its "
                         "own)", failed, here=False)
    return flat[:-world - 1].view(shape), bool(flat[-1])


def greedy_over_ranks(comm: TensorParallelComm, hidden: torch.Tensor, head: torch.Tensor,
                       stop: bool) -> tuple[torch.Tensor, bool]:
    """[B, C] hidden states -> [B] tokens of the largest logit over the whole vocabulary,
    each rank multiplying only its slice of the ``head`` rows; one message (each rank
    fills its slot, the others stay zero) carries every rank's best (logit, token) and the
    first rank's stop flag."""
    world, rank = comm.tp_size, comm.rank
    shape, dtype = (world, 2, hidden.size(0)), token_dtype(head.size(0))

    def best_of_my_slice() -> torch.Tensor:
        lo, hi = vocab_slice(head.size(0), rank, world)
        message = torch.zeros(shape, dtype=dtype, device=hidden.device)
        if hi > lo:
            best, index = F.linear(hidden, head[lo:hi]).float().max(-1)  # first max on a tie
            message[rank, 0] = best
            message[rank, 1] = index + lo
        else:  # more ranks than rows to share: this rank offers nothing
            message[rank, 0] = float("-inf")
        return message

    everyone, stop = _exchange(comm, best_of_my_slice, shape, dtype, hidden.device, stop)
    # the largest logit; on a tie the lowest rank, whose tokens are the lower ids
    winner = everyone[:, 0].argmax(0)
    tokens = everyone[:, 1].gather(0, winner[None]).squeeze(0)
    return tokens.long(), stop


def token_dtype(vocab_size: int) -> torch.dtype:
    """The float type that carries token ids exactly: float32 below 2**24. Decided from the
    vocabulary, the same on every rank (the ranks' tokens may differ)."""
    return torch.float32 if vocab_size <= 2**24 else torch.float64


def from_first_rank(comm: TensorParallelComm, sample: Callable[[], torch.Tensor],
                     batch: int, vocab_size: int, device: torch.device,
                     stop: bool) -> tuple[torch.Tensor, bool]:
    """The group's first rank's ``sample()`` [B] and stop flag, on every rank, in one
    message through the model's own all-reduce (the others add zeros and do not sample:
    only the first rank's tokens count): the same fast path as the model's syncs."""
    dtype = token_dtype(vocab_size)

    def mine() -> torch.Tensor:
        if comm.rank != 0:
            return torch.zeros(batch, dtype=dtype, device=device)
        return sample().to(dtype)

    tokens, stop = _exchange(comm, mine, (batch,), dtype, device, stop)
    return tokens.long(), stop


def _finish(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_steps(model: ReducedSyncGPT, idx: torch.Tensor, max_new_tokens: int,
                   temperature: float = 1.0, top_k: int | None = None,
                   seed: int | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   vocab_size: int | None = None) -> Iterator[DecodeStep]:
    """Yield the prefill's step (its token is the first new one), then one step per further
    token: ``max_new_tokens`` steps in all. Every rank of the model's tensor-parallel group
    must iterate together. The model is in eval mode meanwhile (no dropout).

    ``should_stop`` (read on the group's first rank after each step; a client that went
    away) ends generation on every rank: its answer travels with the step's tokens.
    ``vocab_size`` (a tokenizer's, below a padded model vocabulary: GPT-2's 50257 of 50304)
    keeps the tokens below it."""
    check_prompt(model, idx, max_new_tokens)
    head = model.wte.weight  # the tied LM head
    if vocab_size is not None:
        if not 1 <= vocab_size <= head.size(0):
            raise UsageError(f"vocab_size must be in [1, {head.size(0)}], got {vocab_size}")
        head = head[:vocab_size]
    check_sampling(temperature, top_k, head.size(0))
    if max_new_tokens == 0:
        return
    comm = model.comm
    distributed = not comm.emulated
    greedy = samples_greedily(temperature)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    # the last token is never fed back: its positions are not cached
    cache = model.new_kv_cache(idx.size(0), idx.size(1) + max_new_tokens - 1)
    was_training = model.training
    model.eval()
    # Generation counts its own syncs; a training step's counts in progress are kept aside.
    counter = comm.counter
    kept = (counter.blocks, counter.grad_syncs)
    counter.reset()
    try:
        inputs = idx
        for i in range(max_new_tokens):
            start = time.perf_counter()
            hidden = model.final_hidden(inputs, cache)[:, -1, :]
            syncs = counter.step()["forward"]
            stop = should_stop is not None and i + 1 < max_new_tokens and should_stop()

            def sample(hidden: torch.Tensor = hidden) -> torch.Tensor:
                return sample_next(F.linear(hidden, head), temperature, top_k, generator)

            if not distributed:
                tokens = sample()
            elif greedy:
                tokens, stop = greedy_over_ranks(comm, hidden, head, stop)
            else:
                tokens, stop = from_first_rank(comm, sample, idx.size(0), head.size(0),
                                                hidden.device, stop)
            _finish(tokens.device)
            yield DecodeStep(i, tokens, inputs.size(1), syncs, time.perf_counter() - start)
            if stop:
                return
            inputs = tokens[:, None]
    finally:
        model.train(was_training)
        counter.blocks, counter.grad_syncs = kept
