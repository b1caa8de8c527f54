"""spd_ext.tp: patterns, sync accounting, exactness against GPT-2, emulated vs distributed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spd_ext.launch import spawn
from spd_ext.tp import (
    BLOCKS,
    DistributedComm,
    EmulatedComm,
    GPTConfig,
    PatternError,
    ReducedSyncGPT,
    check_tp_size,
    parse_pattern,
    tensor_parallel_layout,
)
from spd_ext.tp.sharding import merge_state_dict, shard_state_dict

from conftest import FORCED_FALLBACK

ROOT = Path(__file__).resolve().parents[1]


def tiny(pattern: str, n_layer: int, tp_size: int, **kw) -> GPTConfig:
    base = dict(block_size=16, vocab_size=61, n_layer=n_layer, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **kw}, pattern=pattern, tp_size=tp_size)


def _batch(vocab: int, b: int = 3, t: int = 11, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (b, t), generator=g), torch.randint(vocab, (b, t), generator=g)


def dense_grads(model: ReducedSyncGPT) -> dict[str, torch.Tensor]:
    grads = {n: p.grad for n, p in model.named_parameters()}
    return merge_state_dict(grads, model, model.config.tp_size)


# -- patterns ---------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, n_layer, expected", [
    ("tp*3", 3, ["tp"] * 3),
    ("[tp,spd]*2", 4, ["tp", "spd", "tp", "spd"]),
    ("tp*2, [spd,parallel]", 4, ["tp", "tp", "spd", "parallel"]),
    ("[[tp,palm]*2,ladder]", 5, ["tp", "palm", "tp", "palm", "ladder"]),
    ("grouped:3", 6, ["parallel", "parallel", "spd"] * 2),
    ("grouped:1", 2, ["spd", "spd"]),
])
def test_pattern_parsing(pattern: str, n_layer: int, expected: list[str]) -> None:
    assert parse_pattern(pattern, n_layer) == expected


@pytest.mark.parametrize("pattern, n_layer, message", [
    ("[tp,sdp]*6", 12, "unknown block 'sdp' at position 4"),
    ("tp*", 1, "'*' must be followed by a positive count"),
    ("tp*0", 1, "positive count"),
    ("[tp,spd", 2, "missing ']'"),
    ("tp spd", 2, "unexpected 'spd'"),
    ("tp*11", 12, "gives 11 blocks but the model has n_layer=12"),
    ("grouped:5", 12, "divisible by 5"),
    ("grouped:x", 12, "positive integer"),
    ("", 1, "pattern ends"),
])
def test_bad_patterns_name_the_problem(pattern: str, n_layer: int, message: str) -> None:
    with pytest.raises(PatternError, match=message.replace("[", r"\[").replace("*", r"\*")):
        parse_pattern(pattern, n_layer)
    with pytest.raises(PatternError):
        GPTConfig(pattern=pattern, n_layer=n_layer, n_head=4, n_embd=32, tp_size=1)


# -- sync accounting ----------------------------------------------------------------------

SEED_PATTERNS = {  # GPT-2 124M patterns of the seeds: pattern -> syncs measured here
    "tp*12": 24, "[tp,spd]*6": 18, "[tp,spd,spd]*4": 16, "spd*12": 12,
    "[spd,parallel]*6": 7, "[spd,parallel,parallel]*4": 5,
    "grouped:2": 6, "grouped:3": 4, "grouped:4": 3, "grouped:6": 2,
    "palm*12": 12, "ladder*12": 24,
}


def _count_on_meta(config: GPTConfig) -> tuple[ReducedSyncGPT, dict]:
    with torch.device("meta"):
        model = ReducedSyncGPT(config, seed=None)
        idx = torch.zeros(1, 4, dtype=torch.long)
        _, loss = model(idx, idx)
        loss.backward()
    return model, model.sync_counter.step()


@pytest.mark.parametrize("pattern, syncs", SEED_PATTERNS.items())
def test_sync_counts_of_gpt2_patterns(pattern: str, syncs: int) -> None:
    model, counts = _count_on_meta(GPTConfig(pattern=pattern, vocab_size=50257, tp_size=2))
    assert counts["forward"] == syncs
    assert counts["backward"] == syncs  # every forward sync costs one backward all-reduce
    assert model.sync_counter.forward == 0  # step() archived and reset


def test_sync_counts_per_block() -> None:
    _, counts = _count_on_meta(tiny("tp,spd,parallel,palm,ladder,parallel", 6, 2))
    # A forward all-reduce is charged to the block that closes its region, the backward
    # one to the block that opened it: parallel blocks open regions that palm and the
    # final sync close.
    assert counts["blocks"] == {"0:tp": (2, 2), "1:spd": (1, 1), "2:parallel": (0, 1),
                                "3:palm": (1, 0), "4:ladder": (2, 2), "5:parallel": (0, 1),
                                "final": (1, 0)}


def test_a_config_that_names_no_tp_size_is_one_whole_model() -> None:
    """GPTConfig once defaulted to two shards: a single-process model silently emulated
    tensor parallelism 2, and a communicator of one rank was refused."""
    config = GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8, pattern="tp")
    assert config.tp_size == 1
    model = ReducedSyncGPT(config, EmulatedComm(1), seed=0)
    assert model.comm.tp_size == 1


def test_gpt2_124m_parameter_count() -> None:
    for pattern in SEED_PATTERNS:
        with torch.device("meta"):
            model = ReducedSyncGPT(GPTConfig(pattern=pattern, vocab_size=50257, tp_size=2),
                                   seed=None)
        assert abs(model.num_params() - 124e6) / 124e6 < 0.01
        assert model.num_params() == 124_439_808  # Hugging Face gpt2


def test_config_files_state_the_measured_sync_count() -> None:
    files = sorted((ROOT / "configs" / "tp").glob("gpt2-124m-*.json"))
    assert len(files) >= 10
    for path in files:
        spec = json.loads(path.read_text())
        config = GPTConfig(**spec["model"])
        model, counts = _count_on_meta(config)
        assert counts["forward"] == spec["syncs_measured"], path.name
        assert abs(model.num_params() - 124e6) / 124e6 < 0.01, path.name
        # the name states what is measured: gpt2-124m-[grouped-]<N>sync
        assert path.stem == spec["name"] and path.stem.endswith(f"-{counts['forward']}sync"), \
            path.name
        train = ROOT / "configs" / "train" / f"{path.stem}.yaml"
        assert train.is_file() and f"configs/tp/{path.name}" in train.read_text(), train.name


# -- exactness ----------------------------------------------------------------------------

def _hf_model(n_layer: int = 3):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=n_layer, n_head=4, n_embd=32, vocab_size=61,
                                     n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # HF's init is tiny; make the layers matter for the comparison
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_tp_pattern_equals_hugging_face_gpt2(tp_size: int) -> None:
    from spd_ext.tp.convert import from_hf

    hf = _hf_model()
    model = from_hf(hf, tp_size=tp_size)
    idx, tgt = _batch(61)
    ref = hf(idx, labels=None).logits
    ref_loss = torch.nn.functional.cross_entropy(ref.reshape(-1, 61), tgt.reshape(-1))
    ref_loss.backward()
    logits, loss = model(idx, tgt)
    loss.backward()
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    ours = dense_grads(model)
    for name, p in hf.named_parameters():
        key = name.removeprefix("transformer.")
        if key == "lm_head.weight":
            continue  # tied: its gradient is part of wte's
        g = p.grad
        torch.testing.assert_close(ours[key], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(),
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_hugging_face_round_trip_and_refusals() -> None:
    from spd_ext.tp.convert import from_hf, to_hf

    hf = _hf_model(2)
    back = to_hf(from_hf(hf, tp_size=2))
    for k, v in hf.state_dict().items():
        if k in back.state_dict() and not k.endswith("attn.bias"):
            assert torch.equal(back.state_dict()[k], v), k
    with pytest.raises(ValueError, match="different architecture"):
        to_hf(from_hf(hf, pattern="spd*2", tp_size=2))
    hf.config.activation_function = "relu"
    with pytest.raises(ValueError, match="activation_function=relu"):
        from_hf(hf)


def test_layouts_recorded_on_parameters_drive_sharding() -> None:
    model = ReducedSyncGPT(tiny("tp,spd", 2, 2), seed=3)
    layouts = {n: tensor_parallel_layout(p) for n, p in model.named_parameters()}
    assert all(hasattr(p, "tp_layout") for p in model.parameters())  # explicit everywhere
    assert {n for n, lay in layouts.items() if lay.sharded} == {
        f"h.{i}.{m}.{w}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc") for w in
        ("weight", "bias")} | {f"h.{i}.{m}.c_proj.weight" for i in range(2) for m in
                               ("attn", "mlp")}
    assert {n for n, lay in layouts.items() if lay.partial_gradient} == {
        f"h.{i}.ln_{j}.{w}" for i in range(2) for j in (1, 2) for w in ("weight", "bias")}
    dense = model.dense_state_dict()
    full = shard_state_dict(dense, model, 2, 0, 2)
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(merge_state_dict(full, model, 2)[k], v) for k, v in dense.items())
    # the row-parallel bias is handed to the caller, never added to the partial sums
    proj = model.h[0].attn.c_proj
    out, bias = proj(torch.randn(2, 5, 16))
    assert bias is proj.bias and out.shape == (2, 5, 32)


def test_same_seed_same_model_for_every_tp_size() -> None:
    idx, _ = _batch(61)
    outs = [ReducedSyncGPT(tiny("tp*2", 2, t), seed=7)(idx)[0] for t in (1, 2, 4)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


def test_reduced_patterns_change_the_function() -> None:
    torch.manual_seed(0)
    idx, _ = _batch(61)
    dense = ReducedSyncGPT(tiny("tp*2", 2, 2), seed=1)(idx)[0]
    spd = ReducedSyncGPT(tiny("spd*2", 2, 2), seed=1)(idx)[0]
    one_shard = ReducedSyncGPT(tiny("spd*2", 2, 1), seed=1)(idx)[0]
    assert not torch.allclose(dense, spd, atol=1e-4)  # dropping a sync is an approximation
    torch.testing.assert_close(one_shard, dense, rtol=1e-5, atol=1e-6)  # T=1: nothing dropped


def test_blocks_are_usable_alone() -> None:
    # (An input that needs no gradient would also skip the first backward all-reduce.)
    x = torch.randn(2, 5, 32, requires_grad=True)
    for kind, cls in BLOCKS.items():
        comm = EmulatedComm(2)
        block = cls(32, 4, comm)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.1)
        y = block(x)
        assert y.shape == x.shape, kind
        syncs = {"tp": 2, "ladder": 2, "spd": 1, "palm": 1, "parallel": 1}[kind]  # closes itself
        assert comm.counter.forward == syncs, kind
        y.sum().backward()
        assert comm.counter.backward == syncs, kind


# -- bad input ----------------------------------------------------------------------------

def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"n_head \(12\) must be divisible by tp_size \(5\)"):
        GPTConfig(n_head=12, n_embd=60, tp_size=5)
    with pytest.raises(ValueError, match="tensor-parallel size 4 does not divide the world size 6"):
        check_tp_size(4, 6)
    with pytest.raises(ValueError, match="tp_size is 2 but the communicator spans 4"):
        ReducedSyncGPT(tiny("tp*1", 1, 2), EmulatedComm(4))


def test_mismatched_checkpoint_shapes_are_named() -> None:
    small = ReducedSyncGPT(tiny("tp*1", 1, 2), seed=0).dense_state_dict()
    wider = ReducedSyncGPT(tiny("tp*1", 1, 2, n_embd=48), seed=None)
    with pytest.raises(ValueError, match="wte.weight: checkpoint shape"):
        wider.load_dense_state_dict(small)
    deeper = ReducedSyncGPT(tiny("tp*2", 2, 2), seed=None)
    with pytest.raises(ValueError, match="missing"):
        deeper.load_dense_state_dict(small)


# -- emulated == distributed --------------------------------------------------------------

def _compare_modes(rank: int, world: int, pattern: str, n_layer: int, backend: str) -> list[str]:
    config = tiny(pattern, n_layer, world, n_head=2 * world, n_embd=8 * world)
    emulated = ReducedSyncGPT(config, seed=5)
    distributed = ReducedSyncGPT(config, DistributedComm(backend=backend), seed=5)
    failures: list[str] = []

    def check(label: str, a: torch.Tensor, b: torch.Tensor) -> None:
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
            failures.append(f"rank {rank} {pattern} {label}: max diff {(a - b).abs().max():.3g}")

    # SGD: linear in the gradients, so it compares the math (AdamW's normalization would
    # blow 1e-9 rounding differences of near-zero gradients up to visible updates).
    opt_e = torch.optim.SGD(emulated.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(distributed.parameters(), lr=0.1)
    for step in range(2):  # the second forward runs on the updated weights
        idx, tgt = _batch(config.vocab_size, seed=step)
        logits_e, loss_e = emulated(idx, tgt)
        logits_d, loss_d = distributed(idx, tgt)
        check(f"step {step} logits", logits_d, logits_e)
        loss_e.backward()
        loss_d.backward()
        distributed.sync_partial_grads_()
        params_e = dict(emulated.named_parameters())
        for name, p in distributed.named_parameters():
            ref = params_e[name].grad
            check(f"grad {name}", p.grad, ref[rank:rank + 1]
                  if tensor_parallel_layout(p).sharded else ref)
        counts_e, counts_d = emulated.sync_counter.step(), distributed.sync_counter.step()
        if (counts_e["forward"], counts_e["backward"]) != (counts_d["forward"],
                                                            counts_d["backward"]):
            failures.append(f"{pattern}: sync counts differ {counts_e} vs {counts_d}")
        opt_e.step()
        opt_d.step()
        opt_e.zero_grad()
        opt_d.zero_grad()
    full = distributed.dense_state_dict()  # collective
    for name, value in emulated.dense_state_dict().items():
        check(f"updated {name}", full[name], value)
    return failures


MIXED = [("tp,spd,parallel,palm,ladder", 5), ("[parallel,ladder,spd]*2", 6), ("grouped:2", 4)]


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.skipif(
    FORCED_FALLBACK, reason="4-rank jobs run once, against the kernels"))])
def test_emulated_equals_distributed(world: int) -> None:
    for pattern, n_layer in MIXED:
        for failures in spawn(_compare_modes, world, pattern, n_layer, "spd_ext", timeout=240):
            assert not failures, "\n".join(failures[:5])


def test_distributed_over_torch_distributed_backend() -> None:
    for failures in spawn(_compare_modes, 2, "ladder,spd,parallel", 3, "torch", timeout=240):
        assert not failures, "\n".join(failures[:5])


def test_local_pretrained_weights_load(tmp_path) -> None:
    from spd_ext.tp.convert import load_pretrained

    hf = _hf_model(2)
    hf.save_pretrained(tmp_path / "gpt2-tiny")
    model = load_pretrained(tmp_path / "gpt2-tiny", pattern="[tp,spd]", tp_size=2)
    assert model.config.pattern == "[tp,spd]" and model.kinds == ["tp", "spd"]
    for k, v in model.dense_state_dict().items():
        assert torch.equal(v, hf.state_dict()[f"transformer.{k}"]), k
    with pytest.raises(FileNotFoundError, match="no Hugging Face model folder"):
        load_pretrained(tmp_path / "missing")
