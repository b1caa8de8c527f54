"""KV-cached generation: equal to the uncached model, to Hugging Face's generate, and
distributed == emulated."""

from __future__ import annotations

import pytest
import torch

from spd_ext.launch import spawn
from spd_ext.tp import DistributedComm, GPTConfig, ReducedSyncGPT

from conftest import FORCED_FALLBACK

PATTERNS = [("tp*4", 8), ("spd*4", 4), ("palm*4", 4), ("ladder*4", 8), ("parallel*4", 1),
            ("[parallel,spd]*2", 2), ("parallel,parallel,tp,spd", 3), ("grouped:2", 2)]


def tiny(pattern: str, tp_size: int = 2, **kw) -> GPTConfig:
    base = dict(block_size=32, vocab_size=61, n_layer=4, n_head=4, n_embd=32, dropout=0.1)
    return GPTConfig(**{**base, **kw}, pattern=pattern, tp_size=tp_size)


def uncached_logits(model: ReducedSyncGPT, tokens: torch.Tensor, prompt: int) -> list:
    """Each step's last-position logits by a full forward over the sequence so far."""
    model.eval()
    with torch.no_grad():
        return [model(tokens[:, :n])[0][:, -1] for n in range(prompt, tokens.size(1))]


@pytest.mark.parametrize("pattern, syncs", PATTERNS)
def test_cached_steps_equal_the_uncached_model(pattern: str, syncs: int) -> None:
    model = ReducedSyncGPT(tiny(pattern), seed=3)
    model.train()  # generation switches dropout off and restores the mode
    prompt = torch.randint(61, (3, 7), generator=torch.Generator().manual_seed(0))
    cached = []
    original = model.final_hidden  # what generation runs (it applies the head itself)

    def recording(idx, kv_cache=None):
        hidden = original(idx, kv_cache)
        cached.append(torch.nn.functional.linear(hidden[:, -1], model.wte.weight))
        return hidden

    model.final_hidden = recording
    steps = list(model.generate_steps(prompt, 9, temperature=0.8, top_k=20, seed=1))
    del model.final_hidden
    assert model.training
    assert len(cached) == 9  # one forward per step, every one compared below
    tokens = torch.cat([prompt] + [s.tokens[:, None] for s in steps], dim=1)
    for i, (ours, ref) in enumerate(zip(cached, uncached_logits(model, tokens, 7))):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, i=i: f"{pattern} step {i}: {m}")
    assert [s.positions for s in steps] == [7] + [1] * 8
    assert all(s.syncs == syncs for s in steps)  # per decoded token, as in training's forward
    again = model.generate(prompt, 9, temperature=0.8, top_k=20, seed=1)
    assert torch.equal(again, tokens)  # the seed fixes the samples


def test_the_last_new_token_needs_no_position() -> None:
    """The last new token is never fed back, so prompt + new tokens may be one more than
    the context: a prompt that fills the context still gets a token, and a full run
    matches the uncached model (which never sees more than the context)."""
    model = ReducedSyncGPT(tiny("spd*4"), seed=3)
    prompt = torch.randint(61, (2, 28), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, 5, temperature=0)  # 28 + 5 = 33 > 32 positions
    assert out.shape == (2, 33)
    for n, ref in zip(range(28, 33), uncached_logits(model, out, 28)):
        assert torch.equal(out[:, n], ref.argmax(-1))
    full = torch.zeros(1, 32, dtype=torch.long)
    assert model.generate(full, 1, temperature=0).shape == (1, 33)
    with pytest.raises(ValueError, match="at most 1 fit"):
        model.generate(full, 2, temperature=0)


def test_vocab_size_keeps_tokens_below_a_tokenizers_vocabulary() -> None:
    """A model's vocabulary may be padded past its tokenizer's (GPT-2: 50304 > 50257):
    greedy and sampled tokens stay below ``vocab_size``; greedy picks the best of those."""
    model = ReducedSyncGPT(tiny("tp*4"), seed=3)
    prompt = torch.randint(61, (4, 5), generator=torch.Generator().manual_seed(0))
    sampled = model.generate(prompt, 20, temperature=5.0, seed=1)[:, 5:]
    assert int(sampled.max()) >= 7  # without the limit, tokens above it come up
    limited = torch.cat([s.tokens[:, None] for s in model.generate_steps(
        prompt, 20, temperature=5.0, seed=1, vocab_size=7)], dim=1)
    assert int(limited.max()) < 7 and not torch.equal(limited, sampled)
    greedy = next(iter(model.generate_steps(prompt, 1, temperature=0, vocab_size=7))).tokens
    model.eval()
    with torch.no_grad():
        best = model(prompt)[0][:, -1, :7].argmax(-1)
    assert torch.equal(greedy, best)
    with pytest.raises(ValueError, match="vocab_size must be in"):
        next(iter(model.generate_steps(prompt, 1, vocab_size=62)))


def test_a_tiny_temperature_samples_the_best_token_not_nan() -> None:
    """logits / 1e-40 overflows to inf; sampling shifts the largest logit to 0 first, so a
    tiny temperature is greedy rather than a NaN distribution (which made multinomial raise
    on every rank)."""
    model = ReducedSyncGPT(tiny("tp*4"), seed=3)
    prompt = torch.randint(61, (4, 5), generator=torch.Generator().manual_seed(0))
    tiny_t = model.generate(prompt, 6, temperature=1e-40, seed=1)
    assert torch.equal(tiny_t, model.generate(prompt, 6, temperature=0))


def test_a_temperature_that_is_zero_in_float32_is_greedy() -> None:
    """1e-300 passes every check (>= 0, finite) but is 0 in float32: logits / it was 0 / 0,
    NaN probabilities, and multinomial raised (it stopped `spd-ext serve`, and `spd-ext
    train` after its last step, before summary.json). Now it is greedy, in sample_next,
    generate and train's sample alike."""
    from spd_ext.data.tokenizers import CharTokenizer
    from spd_ext.tp.generation import sample_next
    from spd_ext.train.outputs import generate as train_sample

    logits = torch.randn(3, 61, generator=torch.Generator().manual_seed(0))
    for t in (1e-300, 1e-46, 1e-39):  # 1e-39 is a float32 subnormal: greedy too
        assert torch.equal(sample_next(logits, t, None, None), logits.argmax(-1)), t
        assert torch.equal(sample_next(logits, t, 5, None), logits.argmax(-1)), t
    model = ReducedSyncGPT(tiny("spd*4"), seed=3)
    prompt = torch.randint(61, (2, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate(prompt, 6, temperature=1e-300, seed=1),
                       model.generate(prompt, 6, temperature=0))
    tok = CharTokenizer("".join(chr(65 + i) for i in range(61)))
    sample = train_sample(model, tok, "ABC", 6, 1e-300, None, 32, 0, "cpu")
    assert sample == train_sample(model, tok, "ABC", 6, 0.0, None, 32, 0, "cpu")


def _a_rank_fails_a_step(rank: int, world: int, backend: str) -> dict:
    """Rank ``rank == world - 1`` (greedy: its slice of the head) or rank 0 (sampling: the
    only rank that samples) raises in the third step; afterwards the group must work."""
    import spd_ext.tp.generation as generation
    from spd_ext.tp.generation import StepFailed

    model = ReducedSyncGPT(tiny("spd*4", world, n_head=2 * world, n_embd=8 * world),
                           DistributedComm(backend=backend), seed=4)
    prompt = torch.randint(61, (2, 6), generator=torch.Generator().manual_seed(2))
    calls = {"n": 0}
    real_slice, real_sample = generation.vocab_slice, generation.sample_next

    def failing(real, who):
        def call(*args, **kwargs):
            calls["n"] += 1
            if rank == who and calls["n"] == 3:
                raise RuntimeError("probability tensor contains either `inf`, `nan`")
            return real(*args, **kwargs)
        return call

    out = {}
    for case, temperature, name, who in (("greedy", 0.0, "vocab_slice", world - 1),
                                         ("sampling", 1.0, "sample_next", 0)):
        calls["n"] = 0
        setattr(generation, name, failing(getattr(generation, name), who))
        steps = []
        try:
            for step in model.generate_steps(prompt, 8, temperature=temperature, seed=0):
                steps.append(step)
            out[case] = "no error"
        except StepFailed as exc:
            out[case] = (len(steps), exc.ranks, exc.here, str(exc))
        finally:
            generation.vocab_slice, generation.sample_next = real_slice, real_sample
    out["after"] = model.generate(prompt, 4, temperature=0).tolist()  # still in lock step
    return out


@pytest.mark.parametrize("backend", ["spd_ext", "torch"])
def test_a_step_that_fails_on_one_rank_fails_on_every_rank_together(backend: str) -> None:
    """A rank whose own part of a step raises tells the others in the step's message
    instead of leaving them in the all-reduce (they waited out the timeout, then every
    rank died): every rank raises StepFailed at that step, and the group goes on."""
    results = spawn(_a_rank_fails_a_step, 2, backend, timeout=120, pg_timeout=30,
                    env={"SPD_EXT_COMM_TIMEOUT": "30"})
    for rank, r in enumerate(results):
        for case, who in (("greedy", 1), ("sampling", 0)):
            steps, ranks, here, message = r[case]
            assert (steps, ranks, here) == (2, [who], rank == who), (rank, case, r[case])
            assert ("probability tensor" in message) == (rank == who), message
        assert r["after"] == results[0]["after"]


def test_greedy_tokens_equal_hugging_face_generate() -> None:
    transformers = pytest.importorskip("transformers")
    from spd_ext.tp.convert import from_hf

    config = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=32, vocab_size=61,
                                     n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=60)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF's init is tiny; make the layers matter
        for name, p in hf.named_parameters():
            if "ln" not in name:
                p.normal_(0, 0.3)
    prompt = torch.randint(60, (2, 5), generator=torch.Generator().manual_seed(1))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                      min_new_tokens=20, do_sample=False, use_cache=True, pad_token_id=0)
    for tp_size in (1, 2):
        model = from_hf(hf, tp_size=tp_size)
        assert torch.equal(model.generate(prompt, 20, temperature=0), ref), tp_size


def test_bad_arguments_name_the_problem() -> None:
    model = ReducedSyncGPT(tiny("spd*4"), seed=0)
    ok = torch.zeros(1, 4, dtype=torch.long)
    cases = [
        (dict(idx=torch.zeros(1, 30, dtype=torch.long), max_new_tokens=5), "exceed the model's "
         "context of 32"),
        (dict(idx=torch.full((1, 3), 61), max_new_tokens=1), "token id 61 is outside"),
        (dict(idx=torch.full((1, 3), -1), max_new_tokens=1), "token id -1 is outside"),
        (dict(idx=torch.zeros(4, dtype=torch.long), max_new_tokens=1), "non-empty"),
        (dict(idx=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=1), "non-empty"),
        (dict(idx=ok, max_new_tokens=-1), "max_new_tokens must be"),
        (dict(idx=ok, max_new_tokens=2, temperature=-0.5), "temperature must be"),
        (dict(idx=ok, max_new_tokens=2, temperature=float("nan")), "temperature must be"),
        (dict(idx=ok, max_new_tokens=2, top_k=0), "top_k must be"),
        (dict(idx=ok, max_new_tokens=2, top_k=62), "top_k must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.generate(**kwargs)
    assert torch.equal(model.generate(ok, 0), ok)
    cache = model.new_kv_cache(2, 8)
    with pytest.raises(ValueError, match="made for 4 blocks and batch 2"):
        model(ok, kv_cache=cache)
    model(torch.zeros(2, 8, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="holds 8 positions; 8 are used"):
        model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)


def _generate_both_ways(rank: int, world: int, backend: str) -> list[str]:
    failures = []
    prompt = torch.randint(61, (2, 6), generator=torch.Generator().manual_seed(2))
    for pattern, syncs in PATTERNS:
        config = tiny(pattern, world, n_head=2 * world, n_embd=8 * world)
        emulated = ReducedSyncGPT(config, seed=4)
        distributed = ReducedSyncGPT(config, DistributedComm(backend=backend), seed=4)
        ref = emulated.generate(prompt, 12, temperature=0)
        steps = list(distributed.generate_steps(prompt, 12, temperature=0))
        ours = torch.cat([prompt] + [s.tokens[:, None] for s in steps], dim=1)
        if not torch.equal(ours, ref):
            failures.append(f"rank {rank} {pattern}: {ours.tolist()} != {ref.tolist()}")
        if any(s.syncs != syncs for s in steps):
            failures.append(f"rank {rank} {pattern}: syncs {[s.syncs for s in steps]}")
        # sampling: the group's first rank samples, every rank gets its tokens
        sampled = distributed.generate(prompt, 8, temperature=1.0, seed=rank)
        everyone = [torch.empty_like(sampled) for _ in range(world)]
        torch.distributed.all_gather(everyone, sampled)
        if not all(torch.equal(t, everyone[0]) for t in everyone):
            failures.append(f"rank {rank} {pattern}: sampled tokens differ across ranks")
    # a stop decided on the group's first rank ends generation on every rank together
    model = ReducedSyncGPT(tiny("[parallel,spd]*2", world, n_head=2 * world,
                                n_embd=8 * world), DistributedComm(backend=backend), seed=4)
    seen: list[int] = []

    def stop_after_three() -> bool:
        seen.append(1)
        return rank == 0 and len(seen) >= 3  # other ranks would never stop on their own

    steps = list(model.generate_steps(prompt, 12, temperature=0, should_stop=stop_after_three))
    if len(steps) != 3:
        failures.append(f"rank {rank}: {len(steps)} steps after a stop at the third")
    return failures


@pytest.mark.parametrize("world, backend", [(2, "spd_ext"), (2, "torch"), pytest.param(
    4, "spd_ext", marks=pytest.mark.skipif(FORCED_FALLBACK, reason="4-rank jobs run once, "
                                           "against the kernels"))])
def test_distributed_generation_equals_emulated(world: int, backend: str) -> None:
    for failures in spawn(_generate_both_ways, world, backend, timeout=240):
        assert not failures, "\n".join(failures[:5])


def _greedy_over_ranks_cases(rank: int, world: int) -> dict:
    from spd_ext.tp.generation import greedy_over_ranks

    comm = DistributedComm(backend="torch")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 4, generator=g)
    out = {}
    for vocab in (10, 3):  # 3 rows on 4 ranks: one rank has none
        head = torch.randn(vocab, 4, generator=g)
        tokens, _ = greedy_over_ranks(comm, hidden, head, stop=False)
        out[f"random {vocab}"] = (tokens.tolist(), (hidden @ head.T).argmax(-1).tolist())
    head = torch.randn(10, 4, generator=g)
    head[2] = head[9] = 100.0  # the same largest logit in two ranks' slices
    tokens, stop = greedy_over_ranks(comm, torch.ones(2, 4), head, stop=rank == 0)
    out["tie"], out["stop"] = tokens.tolist(), stop
    return out


def test_greedy_decoding_over_a_split_head_equals_argmax() -> None:
    """Each rank multiplies its slice of the LM head's rows; the token is the argmax over
    the whole vocabulary, the lowest id on a tie, on every rank; the first rank's stop
    flag reaches all."""
    from spd_ext.tp.generation import vocab_slice

    assert [vocab_slice(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert vocab_slice(3, 3, 4) == (3, 3)
    for r in spawn(_greedy_over_ranks_cases, 4, timeout=120):
        for case in ("random 10", "random 3"):
            ours, expected = r[case]
            assert ours == expected, case
        assert r["tie"] == [2, 2] and r["stop"] is True


def test_bench_generate_reports_every_point() -> None:
    from spd_ext.bench import generate as bench

    cfg = bench.GenerateBenchConfig(patterns="tp*2;grouped:2", batch_sizes="1,2", n_layer=2,
                                    vocab_size=61, prompt_len=4, new_tokens=5, repeats=1)
    rows = bench.run(cfg)
    assert [(r["backend"], r["batch"], r["pattern"], r["syncs_per_token"]) for r in rows] == [
        (b, n, p, s) for b in ("torch", "spd_ext") for n in (1, 2)
        for p, s in (("tp*2", 4), ("grouped:2", 1))]
    assert all(0 < r["p50_s"] <= r["p99_s"] and r["tokens_per_s"] > 0 for r in rows)
    assert "decode p50 ms" in bench.table(rows)
    for bad, message in [(dict(batch_sizes="0"), "batch-sizes"), (dict(nproc=1), "nproc"),
                         (dict(new_tokens=0), "new-tokens"), (dict(backends="x"), "backend")]:
        with pytest.raises(ValueError, match=message):
            bench.GenerateBenchConfig(**bad).check()
