"""spd_ext.dp and data sharding: weighted aggregation, signals, DDP hook, robust baselines."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from spd_ext.data import Corruption, ShardedSampler, TokenDataset
from spd_ext.dp import (
    MeanAggregator,
    RobustAggregator,
    SignalWeightedAggregator,
    SignalWeightingState,
    WeightError,
    centered_clipping,
    coordinate_median,
    make_signal,
    make_weight_map,
    signal_weighted_hook,
    trimmed_mean,
)
from spd_ext.launch import spawn
from spd_ext.tp import GPTConfig, ReducedSyncGPT


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("SPD_EXT_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text("".join(chr(97 + (i * i + 3 * i) % 26) for i in range(20000)))
    return path


def _model(vocab: int = 26) -> ReducedSyncGPT:
    return ReducedSyncGPT(GPTConfig(block_size=16, vocab_size=vocab, n_layer=2, n_head=2,
                                    n_embd=16, pattern="tp*2", tp_size=1), seed=0)


# -- weight maps and signals (single process) ---------------------------------------------

def test_softmax_map_floor_warmup_and_smoothing() -> None:
    wm = make_weight_map("softmax", temperature=1.0, floor=0.1, ema=0.5, warmup_steps=2)
    assert wm([1.0, 3.0], 0, higher_is_better=False).tolist() == [0.5, 0.5]  # warm-up
    w = wm([1.0, 30.0], 2, higher_is_better=False).tolist()
    assert sum(w) == pytest.approx(1.0) and min(w) >= 0.1 - 1e-12
    assert w[0] == pytest.approx(0.5 * 0.5 + 0.5 * 0.9, rel=1e-6)  # EMA of [.5,.5] and floor
    with pytest.raises(ValueError, match="no room for 4 ranks"):
        make_weight_map("softmax", floor=0.3)([1, 2, 3, 4], 0, True)


def test_inverse_map_and_its_refusals() -> None:
    w = make_weight_map("inverse")([1.0, 3.0], 0, higher_is_better=False)
    assert w.tolist() == pytest.approx([0.75, 0.25])
    assert not torch.isfinite(make_weight_map("inverse")([1.0, 0.0], 0, False)).any()
    with pytest.raises(ValueError, match="lower-is-better"):
        make_weight_map("inverse")([1.0, 3.0], 0, higher_is_better=True)
    with pytest.raises(ValueError, match="unknown weighting 'exp'"):
        make_weight_map("exp")


def test_signals() -> None:
    loss = make_signal("loss_ema", beta=0.5)
    for v in (4.0, 2.0):
        loss.observe_loss(v)
    assert float(loss.raw()) == pytest.approx(3.0) and not loss.higher_is_better
    norms = make_signal("grad_norm_stability", window=4)
    for scale in (1.0, 1.1, 0.9):
        norms.begin_gradient()
        norms.observe_gradient_piece(torch.full((4,), scale / 2), None)
        norms.end_gradient()
    assert float(norms.raw()) == pytest.approx(1.0 / 0.1, rel=1e-6)
    cos = make_signal("cosine_to_prev_global", beta=0.0)
    cos.begin_gradient()
    cos.observe_gradient_piece(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    cos.end_gradient()
    assert float(cos.raw()) == pytest.approx(math.sqrt(0.5))
    with pytest.raises(ValueError, match="unknown signal 'accuracy'"):
        make_signal("accuracy")


# -- robust baselines ----------------------------------------------------------------------

def test_robust_rules_resist_one_outlier() -> None:
    honest = torch.tensor([[1.0, 2.0], [1.2, 2.2], [0.8, 1.8]])
    stacked = torch.cat([honest, torch.tensor([[100.0, -100.0]])])
    assert torch.allclose(trimmed_mean(stacked, 1), torch.tensor([1.1, 1.9]))
    assert torch.allclose(coordinate_median(stacked), torch.tensor([1.1, 1.9]))
    clipped = centered_clipping(stacked, honest.mean(0), tau=0.5, iterations=3)
    assert (clipped - honest.mean(0)).norm() < 0.5  # the outlier moves it by at most tau/4
    with pytest.raises(ValueError, match="leaves nothing"):
        trimmed_mean(stacked, 2)


# -- data sharding -------------------------------------------------------------------------

def test_shards_are_disjoint_and_validation_is_clean(corpus) -> None:
    data = TokenDataset(corpus, "char")
    corrupt = Corruption("token_swap", 1.0, seed=1)
    a = ShardedSampler(data, 0, 2, 4, 16, seed=0, sharding="clean_vs_corrupt",
                       corrupt_ranks=(1,), corruption=corrupt)
    b = ShardedSampler(data, 1, 2, 4, 16, seed=0, sharding="clean_vs_corrupt",
                       corrupt_ranks=(1,), corruption=corrupt)
    assert a.shard.base is not None and len(a.shard) == len(b.shard)
    assert not a.corrupted and b.corrupted
    assert torch.equal(a("val", -1)[0], b("val", -1)[0])  # validation: same and clean
    assert not torch.equal(a("train", 0)[0], b("train", 0)[0])


@pytest.mark.parametrize("kind", ["token_swap", "shuffle", "label_noise", "duplicate"])
def test_corruptions(corpus, kind: str) -> None:
    data = TokenDataset(corpus, "char")
    clean = ShardedSampler(data, 1, 2, 64, 32, seed=0)
    bad = ShardedSampler(data, 1, 2, 64, 32, seed=0, sharding="clean_vs_corrupt",
                         corrupt_ranks=(1,), corruption=Corruption(kind, 0.3, seed=2))
    (x0, y0), (x1, y1) = clean("train", 3), bad("train", 3)
    if kind == "token_swap":
        changed = (torch.cat([x0, y0[:, -1:]], 1) != torch.cat([x1, y1[:, -1:]], 1)).float()
        assert 0.2 < changed.mean() < 0.3  # 30% replaced, some by the same token
        assert torch.equal(x1[:, 1:], y1[:, :-1])  # the text is corrupted, not the pairing
    elif kind == "shuffle":
        assert not torch.equal(x0, x1)
        for row0, row1 in zip(x0, x1):  # same tokens within every 8-token window
            assert torch.equal(row0[:24].view(3, 8).sort(1).values,
                               row1[:24].view(3, 8).sort(1).values)
    elif kind == "label_noise":
        assert torch.equal(x0, x1) and 0.2 < (y0 != y1).float().mean() < 0.31
    else:
        assert len(bad.starts) == int(bad.n_windows * 0.3)
        few = ShardedSampler(data, 1, 2, 64, 32, seed=0, sharding="clean_vs_corrupt",
                             corrupt_ranks=(1,), corruption=Corruption(kind, 0.001, seed=2))
        rows = {tuple(row.tolist()) for s in range(20) for row in few("train", s)[0]}
        assert len(few.starts) == int(few.n_windows * 0.001) and len(rows) <= len(few.starts)
        assert len({tuple(row.tolist()) for row in x0}) > len(few.starts)


def test_bad_sharding_input(corpus) -> None:
    data = TokenDataset(corpus, "char")
    with pytest.raises(ValueError, match="unknown corruption 'swap'"):
        Corruption("swap")
    with pytest.raises(ValueError, match=r"probability must be in \[0, 1\]"):
        Corruption("token_swap", 1.5)
    with pytest.raises(ValueError, match="unknown sharding"):
        ShardedSampler(data, 0, 2, 4, 16, 0, sharding="dirichlet")
    with pytest.raises(ValueError, match="needs corrupt_ranks"):
        ShardedSampler(data, 0, 2, 4, 16, 0, sharding="clean_vs_corrupt")
    with pytest.raises(ValueError, match="outside world"):
        ShardedSampler(data, 0, 2, 4, 16, 0, sharding="clean_vs_corrupt", corrupt_ranks=(5,),
                       corruption=Corruption())


# -- multi-rank ----------------------------------------------------------------------------

def _weighted_reference(rank: int, world: int) -> list[str]:
    failures = []
    model = _model()
    agg = SignalWeightedAggregator("loss_ema", "softmax", floor=0.05, warmup_steps=1)
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        local = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        everyone = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(everyone, local)
        out = agg.reduce(model, step=step, loss=1.0 + rank + step)
        w = out["weights"]
        reduced = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        expect = sum(wi * gi for wi, gi in zip(w, everyone))
        if not torch.allclose(reduced, expect, rtol=1e-5, atol=1e-6):
            failures.append(f"step {step}: max error {(reduced - expect).abs().max():.3g}")
        if step == 0 and w != [1.0 / world] * world:
            failures.append(f"warm-up weights {w}")
        if step > 0 and not w[0] > w[-1]:  # lower loss, more weight
            failures.append(f"step {step}: weights {w} do not favour the lowest loss")
    return failures


@pytest.mark.parametrize("world", [2, 4])
def test_weighted_aggregation_equals_float64_reference(world: int) -> None:
    for failures in spawn(_weighted_reference, world, timeout=180):
        assert not failures, failures


def _weights_agree(rank: int, world: int) -> list[list[float]]:
    agg = SignalWeightedAggregator("loss_ema", "softmax", temperature=0.5, floor=0.1,
                                   ema=0.3, warmup_steps=2)
    out = []
    for step in range(6):
        out.append(agg.compute_weights(step=step, loss=[2.0, 5.0, 2.5][rank] + 0.1 * step))
    return out


def test_weights_agree_sum_to_one_respect_floor_and_warm_up() -> None:
    results = spawn(_weights_agree, 3, timeout=120)
    assert results[0] == results[1] == results[2]  # bitwise, on every rank
    for step, w in enumerate(results[0]):
        assert sum(w) == pytest.approx(1.0) and min(w) >= 0.1 - 1e-12
        if step < 2:
            assert w == [1 / 3] * 3
    assert results[0][-1][1] < results[0][-1][2] < results[0][-1][0]


def _corrupted_rank_training(rank: int, world: int, corpus: str) -> list[float]:
    data = TokenDataset(corpus, "char")
    sampler = ShardedSampler(data, rank, world, 8, 16, seed=0, sharding="clean_vs_corrupt",
                             corrupt_ranks=(1,), corruption=Corruption("token_swap", 0.5))
    model = _model(data.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    agg = SignalWeightedAggregator("loss_ema", "softmax", warmup_steps=5)
    weights = []
    for step in range(25):
        x, y = sampler("train", step)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        weights = agg.reduce(model, step, loss.item())["weights"]
        opt.step()
    return weights


def test_corrupted_rank_gets_less_weight(corpus) -> None:
    w = spawn(_corrupted_rank_training, 2, str(corpus), timeout=180)[0]
    assert w[0] > 0.5 > w[1]


def _ddp_vs_reference(rank: int, world: int) -> list[str]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    reference, model = _model(), _model()
    ddp = DDP(model, bucket_cap_mb=0.001)  # several buckets
    state = SignalWeightingState(SignalWeightedAggregator("loss_ema", "softmax", warmup_steps=1))
    ddp.register_comm_hook(state, signal_weighted_hook)
    agg = SignalWeightedAggregator("loss_ema", "softmax", warmup_steps=1)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.5)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(rank)
    for step in range(3):
        x = torch.randint(26, (4, 8), generator=g)
        y = torch.randint(26, (4, 8), generator=g)
        _, loss_ref = reference(x, y)
        opt_ref.zero_grad()
        loss_ref.backward()
        agg.reduce(reference, step, loss_ref.item())
        opt_ref.step()
        _, loss = ddp(x, y)
        opt.zero_grad()
        state.begin_step(loss.item())
        loss.backward()
        state.end_step()
        opt.step()
    failures = []
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
            failures.append(f"{name}: max diff {(a - b).abs().max():.3g}")
    return failures


def test_ddp_hook_trains_like_the_reference_aggregation() -> None:
    for failures in spawn(_ddp_vs_reference, 2, timeout=180):
        assert not failures, failures


def _nan_refused(rank: int, world: int) -> dict:
    model = _model()
    for p in model.parameters():
        p.grad = torch.full_like(p, 1.0 + rank)
    before = [p.grad.clone() for p in model.parameters()]
    agg = SignalWeightedAggregator("loss_ema", "softmax", warmup_steps=0)
    try:
        agg.reduce(model, step=0, loss=float("nan") if rank == 1 else 2.0)
        message = "no error"
    except WeightError as exc:
        message = str(exc)
    untouched = all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    MeanAggregator().reduce(model, 1, 2.0)  # the group still works
    return {"message": message, "untouched": untouched,
            "mean": next(model.parameters()).grad.flatten()[0].item()}


def test_nan_weights_refuse_the_step_on_every_rank() -> None:
    for r in spawn(_nan_refused, 2, timeout=120):
        assert "ranks [1] report non-finite signals" in r["message"]
        assert "no gradient was changed" in r["message"]
        assert r["untouched"] and r["mean"] == pytest.approx(1.5)


def _inf_gradient_refused(rank: int, world: int) -> dict:
    model = _model()
    for p in model.parameters():
        p.grad = torch.full_like(p, 1.0 + rank)
    if rank == 1:
        next(model.parameters()).grad.view(-1)[3] = float("inf")
    before = [p.grad.clone() for p in model.parameters()]
    agg = SignalWeightedAggregator("loss_ema", "softmax", warmup_steps=0)
    try:
        agg.reduce(model, step=0, loss=2.0)  # finite losses everywhere
        message = "no error"
    except WeightError as exc:
        message = str(exc)
    untouched = all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    return {"message": message, "untouched": untouched}


def test_non_finite_gradients_refuse_the_step_on_every_rank() -> None:
    for r in spawn(_inf_gradient_refused, 2, timeout=120):
        assert "ranks [1] have NaN or inf gradients" in r["message"]
        assert r["untouched"]


def _bad_aggregators(rank: int, world: int) -> list[str]:
    messages = []
    for make in (lambda: SignalWeightedAggregator("accuracy"),
                 lambda: SignalWeightedAggregator(weighting="exp"),
                 lambda: SignalWeightedAggregator("cosine_to_prev_global", "inverse"),
                 lambda: SignalWeightedAggregator(floor=0.6),
                 lambda: RobustAggregator("krum"),
                 lambda: RobustAggregator("trimmed_mean", trim=1)):
        try:
            make()
            messages.append("no error")
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def test_bad_aggregator_configuration() -> None:
    messages = spawn(_bad_aggregators, 2, timeout=120)[0]
    assert "unknown signal 'accuracy'" in messages[0]
    assert "unknown weighting 'exp'" in messages[1]
    assert "needs a lower-is-better signal" in messages[2]
    assert "no room for 2 ranks" in messages[3]
    assert "unknown robust method 'krum'" in messages[4]
    assert "leaves nothing of 2 ranks" in messages[5]


def _trainer_drives_the_aggregator(rank: int, world: int, corpus: str) -> list:
    from spd_ext.train import TrainConfig, Trainer

    data = TokenDataset(corpus, "char")
    sampler = ShardedSampler(data, rank, world, 8, 16, seed=0, sharding="clean_vs_corrupt",
                             corrupt_ranks=(1,), corruption=Corruption("token_swap", 0.5))
    agg = SignalWeightedAggregator("loss_ema", "softmax", warmup_steps=3, record=True)
    cfg = TrainConfig(max_steps=12, batch_size=8, lr=3e-3, warmup_steps=1, eval_interval=0,
                      eval_batches=1, quiet=True)
    Trainer(_model(data.vocab_size), sampler, cfg, hooks=agg).train()
    return agg.history


def test_the_trainer_passes_step_and_loss_to_the_aggregator(corpus) -> None:
    history = spawn(_trainer_drives_the_aggregator, 2, str(corpus), timeout=180)[0]
    assert [h["step"] for h in history] == list(range(12))
    assert all(h["loss"] > 1.0 for h in history)  # losses, not step numbers
    assert history[-1]["weights"][0] > 0.5 > history[-1]["weights"][1]
