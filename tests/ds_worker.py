"""Runs under the real ``deepspeed`` launcher for tests/test_deepspeed.py.

    deepspeed --num_gpus N tests/ds_worker.py --scenario NAME --out DIR

Each scenario trains tiny GPTs through ``spd_ext.deepspeed`` and, in the same job, the
reference the test compares against (computed without DeepSpeed), and writes
``DIR/<scenario>.rank<R>.json``. Batches depend only on (data-parallel rank, step), so
a reference can rebuild any rank's batch.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

import spd_ext.deepspeed as sd
from spd_ext.deepspeed.ops import load_deepspeed_comm_op
from spd_ext.dp.signals import make_signal
from spd_ext.dp.weights import SoftmaxWeights
from spd_ext.staleness import make_strategy, parse_mode
from spd_ext.tp import DistributedComm, EmulatedComm, GPTConfig, ReducedSyncGPT

VOCAB, BLOCK, MICRO = 32, 16, 2
LR, WD, CLIP = 3e-3, 0.1, 1.0


def gpt_config(**overrides) -> GPTConfig:
    base = dict(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16,
                pattern="tp*2", tp_size=1, bias=False)
    return GPTConfig(**{**base, **overrides})


def batch(dp_rank: int, step: int, micro: int = 0, size: int = MICRO) -> tuple:
    g = torch.Generator().manual_seed(100_000 * step + 100 * dp_rank + micro)
    x = torch.randint(0, VOCAB, (size, BLOCK), generator=g)
    # Rank-dependent difficulty, so the loss signals (and weights) differ across ranks.
    y = torch.where(torch.rand(size, BLOCK, generator=g) < 0.3 * (dp_rank + 1),
                    torch.randint(0, VOCAB, (size, BLOCK), generator=g), (x + 1) % VOCAB)
    return x, y


def ds_config(stage: int = 0, bf16: bool = False, gas: int = 1, dp: int = 2,
              section: dict | None = None, clip: float = CLIP) -> dict:
    cfg = {"train_batch_size": MICRO * gas * dp, "train_micro_batch_size_per_gpu": MICRO,
           "gradient_accumulation_steps": gas, "gradient_clipping": clip,
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD,
                                                     "betas": [0.9, 0.99], "eps": 1e-8,
                                                     "torch_adam": True}},
           "zero_optimization": {"stage": stage}, "steps_per_print": 10_000,
           "wall_clock_breakdown": False}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if section is not None:
        cfg["spd_ext"] = section
    return cfg


def sgd(params) -> torch.optim.SGD:
    """The weighting jobs use SGD: its update is proportional to the gradient, so a wrong
    overall scale of the aggregate shows (AdamW would normalize it away)."""
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def reference_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=(0.9, 0.99),
                             eps=1e-8)


def flat_params(model: torch.nn.Module) -> list[float]:
    dense = model.dense_state_dict() if hasattr(model, "dense_state_dict") else \
        model.state_dict()
    return torch.cat([v.float().reshape(-1) for _, v in sorted(dense.items())]).tolist()


def train_engine(engine, steps: int, dp_rank: int, gas: int = 1, first: int = 0) -> list[float]:
    """Every rank's mean micro-batch loss per step."""
    losses = []
    for step in range(first, first + steps):
        total = 0.0
        for micro in range(gas):
            x, y = batch(dp_rank, step, micro)
            _, loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            total += loss.item()
        losses.append(total / gas)
    return losses


# -- signal weighting -------------------------------------------------------------
SIGNAL = {"signal": "loss_ema", "map": "softmax", "temperature": 0.05, "floor": 0.1,
          "warmup_steps": 1}
#: the gradient signals' arguments in the weighting jobs (a short window: 4 steps)
SIGNAL_ARGS = {"grad_norm_stability": {"window": 3}, "cosine_to_prev_global": {"beta": 0.5}}


def weighting_reference(steps: int, world: int, gas: int, optimizer: str = "sgd",
                        signal: str = "loss_ema") -> dict:
    """All ranks in one process: g = sum_i w_i g_i, then clip and SGD (no DeepSpeed). The
    step's weights are decided before its backward: each rank's signal as it would be
    after the step's first micro-batch loss; the step's mean loss then enters the signal
    (with one micro-batch, the same). Gradient signals see the rank's own gradient (the
    mean over its micro-batches) and, for the cosine, the previous step's weighted sum
    before clipping, after the weights are decided: they act one step late."""

    model = ReducedSyncGPT(gpt_config())
    opt = sgd(model.parameters()) if optimizer == "sgd" else reference_optimizer(model)
    args = SIGNAL_ARGS.get(signal, {})
    signals = [make_signal(signal, **args) for _ in range(world)]
    wmap = SoftmaxWeights(temperature=SIGNAL["temperature"], floor=SIGNAL["floor"],
                          warmup_steps=SIGNAL["warmup_steps"])
    history = []
    previous_global = None
    for step in range(steps):
        grads, losses, firsts = [], [], []
        for r in range(world):
            model.zero_grad(set_to_none=True)
            micro_losses = []
            for micro in range(gas):
                _, loss = model(*batch(r, step, micro))
                (loss / gas).backward()
                micro_losses.append(loss.item())
            losses.append(sum(micro_losses) / gas)
            firsts.append(micro_losses[0])
            grads.append([p.grad.clone() for p in model.parameters()])
        estimates = []
        for signal_r, first in zip(signals, firsts):
            provisional = make_signal(signal, **args)
            provisional.load_state_dict(signal_r.state_dict())
            provisional.observe_loss(first)
            estimates.append(provisional.raw())
        weights = wmap(torch.stack(estimates), step, signals[0].higher_is_better).tolist()
        for r in range(world):
            signals[r].observe_loss(losses[r])
            signals[r].begin_gradient()
            signals[r].observe_gradient_piece(torch.cat([g.reshape(-1) for g in grads[r]]),
                                              previous_global)
            signals[r].end_gradient()
        for i, p in enumerate(model.parameters()):
            p.grad = sum(w * g[i] for w, g in zip(weights, grads))
        previous_global = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        history.append({"losses": losses, "weights": weights})
    return {"history": history, "params": flat_params(model)}


#: dtype of each precision's model, and its ds_config entries (fp16: a fixed loss scale, so
#: that no step is skipped and the run compares with the reference step for step)
PRECISIONS = {"fp32": (torch.float32, {}),
              "bf16": (torch.bfloat16, {"bf16": {"enabled": True}}),
              "fp16": (torch.float16, {"fp16": {"enabled": True, "loss_scale": 128}})}


def allow_fp16_on_cpu() -> None:
    """DeepSpeed refuses fp16 on CPUs without oneDNN fp16 kernels (this VM's); torch's CPU
    fp16 arithmetic is complete, only slow, so the tests still exercise DeepSpeed's fp16
    path: its loss scaler, overflow check and skipped steps."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True


def weighted_engine(stage: int, precision: str, gas: int, backend: str = "deepspeed",
                    op: str = "mean", fp16: dict | None = None, signal: str = "loss_ema"):
    """A signal-weighted engine. fp32 and bf16 take the client's SGD (its update shows the
    aggregate's scale); fp16 takes DeepSpeed's own AdamW from the config: at stage 0,
    DeepSpeed's fp16 wrapper of a client optimizer updates fp32 copies the client never
    sees, so plain DeepSpeed does not train there either."""
    dtype, extra = PRECISIONS[precision]
    model = ReducedSyncGPT(gpt_config()).to(dtype)
    weighting = {**SIGNAL, "signal": signal, "signal_args": SIGNAL_ARGS.get(signal, {})}
    section = {"signal_weighting": weighting, "comm": {"backend": backend}}
    config = {**ds_config(stage, gas=gas, section=section), **extra,
              "gradient_allreduce_op": op, "zero_allow_untested_optimizer": True}
    if fp16 is not None:
        config["fp16"] = fp16
    if precision == "fp16":
        engine, *_ = sd.initialize(model=model, model_parameters=model.parameters(),
                                   config=config)
    else:
        del config["optimizer"]  # the client's SGD
        engine, *_ = sd.initialize(model=model, optimizer=sgd(model.parameters()),
                                   config=config)
    return model, engine


def plain(state):
    """A state dict with its tensors as lists (to compare, or to write as JSON)."""
    if isinstance(state, dict):
        return {key: plain(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [plain(value) for value in state]
    return state.tolist() if isinstance(state, torch.Tensor) else state


def full_params(model: torch.nn.Module) -> list[float]:
    """Every parameter whole (ZeRO-3 partitions them)."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters(list(model.parameters())):
        return flat_params(model)


def scenario_weighting(rank: int, world: int, out: dict) -> None:
    allow_fp16_on_cpu()
    steps = 4
    cases = {  # name -> (stage, precision, gas, backend, gradient_allreduce_op)
        # every stage x precision x gradient accumulation, DeepSpeed's reduction
        **{f"z{stage}_{precision}" + ("_gas4" if gas == 4 else ""):
           (stage, precision, gas, "deepspeed", "mean")
           for stage in (0, 1, 2, 3) for precision in PRECISIONS for gas in (1, 4)},
        # spd_ext's reduction (stage 0) and DeepSpeed's sum op
        "z0_fp32_spd": (0, "fp32", 1, "spd_ext", "mean"),
        "z0_fp32_spd_gas4": (0, "fp32", 4, "spd_ext", "mean"),
        "z0_bf16_spd": (0, "bf16", 1, "spd_ext", "mean"),
        "z0_fp32_sum_op": (0, "fp32", 1, "deepspeed", "sum"),
        "z1_fp32_sum_op": (1, "fp32", 1, "deepspeed", "sum"),
        # the gradient signals, where they work (ZeRO 0 and 1; the cosine at 0 only)
        "z0_fp32_grad_norm_stability": (0, "fp32", 1, "deepspeed", "mean"),
        "z0_fp32_spd_grad_norm_stability_gas4": (0, "fp32", 4, "spd_ext", "mean"),
        "z1_fp32_grad_norm_stability": (1, "fp32", 1, "deepspeed", "mean"),
        "z0_fp32_cosine_to_prev_global": (0, "fp32", 1, "deepspeed", "mean"),
        "z0_fp32_cosine_to_prev_global_gas4": (0, "fp32", 4, "deepspeed", "mean"),
        "z0_bf16_grad_norm_stability": (0, "bf16", 1, "deepspeed", "mean"),
        "z1_bf16_grad_norm_stability": (1, "bf16", 1, "deepspeed", "mean"),
        "z0_bf16_cosine_to_prev_global": (0, "bf16", 1, "deepspeed", "mean"),
        "z0_fp16_grad_norm_stability": (0, "fp16", 1, "deepspeed", "mean"),
        "z1_fp16_grad_norm_stability": (1, "fp16", 1, "deepspeed", "mean"),
        "z0_fp16_cosine_to_prev_global": (0, "fp16", 1, "deepspeed", "mean"),
    }
    # fp16 with the gradient signals: a loss scale that doubles every step (no overflow in
    # these 4 steps), which the signals must divide out of the gradient they see
    growing = {"enabled": True, "initial_scale_power": 4, "loss_scale_window": 1,
               "hysteresis": 1}
    for name, (stage, precision, gas, backend, op) in cases.items():
        signal = next((s for s in SIGNAL_ARGS if s in name), "loss_ema")
        fp16 = growing if precision == "fp16" and signal != "loss_ema" else None
        model, engine = weighted_engine(stage, precision, gas, backend, op, fp16=fp16,
                                        signal=signal)
        weights = []
        losses = []
        for step in range(steps):
            losses += train_engine(engine, 1, rank, gas, first=step)
            weights.append(engine.spd_ext.last["weights"])
        out[name] = {"losses": losses, "weights": weights, "params": full_params(model),
                     "reference": f"{gas}_{'adamw' if precision == 'fp16' else 'sgd'}"
                     + ("" if signal == "loss_ema" else f"_{signal}"),
                     "precision": precision}
    # attach() to an engine made by plain deepspeed.initialize (section in its config)
    model = ReducedSyncGPT(gpt_config())
    config = ds_config(0, section={"signal_weighting": SIGNAL})
    del config["optimizer"]
    engine, *_ = deepspeed.initialize(model=model, optimizer=sgd(model.parameters()),
                                      config=config)
    sd.attach(engine)
    losses = train_engine(engine, steps, rank)
    out["attach"] = {"losses": losses, "params": flat_params(model), "reference": "1_sgd",
                     "precision": "fp32"}
    if rank == 0:
        out["reference"] = {f"{gas}_{opt}": weighting_reference(steps, world, gas, opt)
                            for gas in (1, 4) for opt in ("sgd", "adamw")}
        out["reference"].update({f"{gas}_{opt}_{signal}": weighting_reference(
            steps, world, gas, opt, signal) for gas in (1, 4) for signal in SIGNAL_ARGS
            for opt in ("sgd", "adamw")})


# -- staleness ----------------------------------------------------------------------
def staleness_reference(mode: str, steps: int, rank: int) -> dict:
    """spd_ext.staleness's strategy with the Trainer's order of operations (no DeepSpeed)."""
    model = ReducedSyncGPT(gpt_config())
    opt = reference_optimizer(model)
    strategy = make_strategy(parse_mode(mode), model)
    losses = []
    for step in range(steps):
        _, loss = model(*batch(rank, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        extra = strategy.after_backward(model, step, loss.item()) or {}
        if not extra.get("skip_optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
        strategy.after_step(model, step)
        losses.append(loss.item())
    strategy.finish(model)
    return {"losses": losses, "params": flat_params(model)}


def scenario_staleness(rank: int, world: int, out: dict) -> None:
    steps = 6
    for mode in ("delayed:2", "local_sgd:2", "diloco:3"):
        model = ReducedSyncGPT(gpt_config())
        engine, *_ = sd.initialize(model=model, model_parameters=model.parameters(),
                                   config=ds_config(0, section={"staleness": {"mode": mode}}))
        losses = train_engine(engine, steps, rank)
        out[mode] = {"losses": losses, "params": flat_params(model),
                     "reference": staleness_reference(mode, steps, rank)}


# -- checkpoints ----------------------------------------------------------------------
def scenario_resume(rank: int, world: int, out: dict) -> None:
    steps, cut = 6, 3
    cases = {"weighted_z0": (0, {"signal_weighting": SIGNAL}),
             "weighted_z1": (1, {"signal_weighting": {**SIGNAL, "signal": "grad_norm_stability",
                                                      "signal_args": {"window": 3}}}),
             "delayed": (0, {"staleness": {"mode": "delayed:2"}}),
             "diloco": (0, {"staleness": {"mode": "diloco:2"}})}
    root = Path(tempfile.mkdtemp(prefix="spd_ext_ds_ckpt_")) if rank == 0 else None
    shared = [str(root)]
    dist.broadcast_object_list(shared, src=0)
    for name, (stage, section) in cases.items():
        def make(stage=stage, section=section):
            model = ReducedSyncGPT(gpt_config())
            engine, *_ = sd.initialize(model=model, model_parameters=model.parameters(),
                                       config=ds_config(stage, section=section))
            return engine
        full = train_engine(make(), steps, rank)
        first = make()
        part = train_engine(first, cut, rank)
        first.save_checkpoint(f"{shared[0]}/{name}")
        resumed = make()
        resumed.load_checkpoint(f"{shared[0]}/{name}")
        part += train_engine(resumed, steps - cut, rank, first=cut)
        # the same resume without spd_ext's state: what the test shows differs
        bare = make()
        bare.spd_ext.load_state_dict = lambda state: None
        bare.load_checkpoint(f"{shared[0]}/{name}")
        lost = train_engine(bare, steps - cut, rank, first=cut)
        out[name] = {"full": full, "resumed": part, "without_state": full[:cut] + lost,
                     "files": sorted(str(p.relative_to(shared[0])) for p in
                                     Path(shared[0], name).rglob("rank*.pt"))}


# -- islands -------------------------------------------------------------------------
def scenario_islands(rank: int, world: int, out: dict) -> None:
    steps, H, cut = 6, 2, 3
    islands = 2
    per = world // islands
    section = {"staleness": {"mode": f"diloco:{H}", "islands": islands}}
    island = rank // per

    def make(stage: int, bf16: bool = False):
        model = ReducedSyncGPT(gpt_config()).to(torch.bfloat16 if bf16 else torch.float32)
        engine, *_ = sd.initialize(model=model, model_parameters=model.parameters(),
                                   config=ds_config(stage, dp=per, section=section, bf16=bf16))
        return model, engine

    def train(engine, step: int) -> float:
        local = engine.spd_ext.topology.dp_ranks.index(rank)
        _, loss = engine(*batch(per * island + local, step))
        engine.backward(loss)
        engine.step()
        t = torch.tensor([loss.item()])
        dist.all_reduce(t, group=engine.spd_ext.topology.dp_group)
        return t.item() / per

    for stage in (1, 2, 3):
        model, engine = make(stage)
        losses = [train(engine, step) for step in range(steps)]
        out[f"z{stage}"] = {"island_losses": losses, "params": full_params(model),
                            "island": island}
        # the same run, checkpointed after `cut` steps and resumed in a new engine
        root = [tempfile.mkdtemp(prefix="spd_ext_ds_islands_") if rank == 0 else None]
        dist.broadcast_object_list(root, src=0)
        resumed = []
        _, first = make(stage)
        for step in range(steps):
            if step == cut:
                first.save_checkpoint(root[0])
                _, first = make(stage)
                first.load_checkpoint(root[0])
            resumed.append(train(first, step))
        out[f"z{stage}"]["resumed"] = resumed
        first.save_checkpoint(root[0], tag="kept_apart", save_latest=False)
        out[f"z{stage}"]["latest"] = Path(root[0], "latest").read_text().strip()
        model, engine = make(stage, bf16=True)
        losses = [train(engine, step) for step in range(steps)]
        out[f"z{stage}_bf16"] = {"island_losses": losses, "params": full_params(model)}
    # Reference: spd_ext.staleness's diloco:H with one worker per island (ranks 0, per, ...)
    # whose batch is the island's batch.
    def island_batch(step: int) -> tuple:
        parts = [batch(per * island + j, step) for j in range(per)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    ref = ReducedSyncGPT(gpt_config())
    ref_losses = diloco_workers(ref, list(range(0, world, per)), steps, H, island_batch)
    if ref_losses is not None:
        out["reference"] = {"island_losses": ref_losses, "params": flat_params(ref)}


def diloco_workers(model: torch.nn.Module, workers: list[int], steps: int, H: int,
                   batch_of) -> list[float] | None:
    """spd_ext.staleness's diloco:H over the ``workers`` ranks (collective: every rank
    creates their group), each training ``model`` alone on ``batch_of(step)`` with the
    reference AdamW and clipping; the worker's losses (None on other ranks)."""
    group = dist.new_group(workers)
    if dist.get_rank() not in workers:
        return None
    opt = reference_optimizer(model)
    strategy = make_strategy(parse_mode(f"diloco:{H}"), model, group=group)
    losses = []
    for step in range(steps):
        _, loss = model(*batch_of(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        strategy.after_step(model, step)
        losses.append(loss.item())
    return losses


# -- tensor x data parallel ----------------------------------------------------------
TP_PATTERN = "parallel,spd"
TP_CLIP = 0.3  # below the gradient norms of these steps, so clipping acts every step


def scenario_tp(rank: int, world: int, out: dict) -> None:
    steps, tp = 4, 2
    dp = world // tp
    for stage, bf16 in ((0, False), (1, False), (2, False), (0, True), (1, True), (2, True)):
        topo = sd.build_topology(tp)
        model = ReducedSyncGPT(gpt_config(pattern=TP_PATTERN, tp_size=tp),
                               DistributedComm(topo.tp_group))
        model = model.to(torch.bfloat16 if bf16 else torch.float32)
        section = {"tensor_parallel": {"size": tp, "pattern": TP_PATTERN}}
        engine, *_ = sd.initialize(model=model, model_parameters=model.parameters(),
                                   config=ds_config(stage, dp=dp, section=section,
                                                    clip=TP_CLIP, bf16=bf16))
        dp_rank = topo.dp_ranks.index(rank)
        losses, syncs, norms = [], [], []
        for step in range(steps):
            _, loss = engine(*batch(dp_rank, step))
            engine.backward(loss)
            engine.step()
            norms.append(engine.spd_ext.last.get("grad_norm"))
            t = torch.tensor([loss.item()])
            dist.all_reduce(t, group=topo.dp_group)
            losses.append(t.item() / dp)
            syncs.append([engine.spd_ext.last.get("syncs_forward"),
                          engine.spd_ext.last.get("syncs_backward"),
                          engine.spd_ext.last.get("grad_syncs")])
        out[f"z{stage}" + ("_bf16" if bf16 else "")] = {
            "losses": losses, "params": flat_params(model), "syncs": syncs,
            "grad_norms": norms, "partial": len(engine.spd_ext._partial)}
    if rank == 0:  # the emulated model on the union of the dp ranks' batches
        ref = ReducedSyncGPT(gpt_config(pattern=TP_PATTERN, tp_size=tp), EmulatedComm(tp))
        opt = reference_optimizer(ref)
        losses, norms = [], []
        for step in range(steps):
            parts = [batch(d, step) for d in range(dp)]
            _, loss = ref(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), TP_CLIP).item())
            opt.step()
            losses.append(loss.item())
        out["reference"] = {"losses": losses, "params": flat_params(ref), "grad_norms": norms}


def scenario_tp_islands(rank: int, world: int, out: dict) -> None:
    """2 DiLoCo islands, each a tensor-parallel pair (tp 2 x dp 1), at ZeRO 1 and 2; the
    reference: spd_ext.staleness's diloco:H with one worker per island, each the emulated
    tensor-parallel model on the island's batch."""
    steps, H, tp, islands = 4, 2, 2, 2
    island = rank // (world // islands)
    section = {"staleness": {"mode": f"diloco:{H}", "islands": islands},
               "tensor_parallel": {"size": tp, "pattern": TP_PATTERN}}
    for stage in (1, 2):
        topo = sd.build_topology(tp, islands)
        model = ReducedSyncGPT(gpt_config(pattern=TP_PATTERN, tp_size=tp),
                               DistributedComm(topo.tp_group))
        engine, *_ = sd.initialize(model=model, model_parameters=model.parameters(),
                                   config=ds_config(stage, dp=world // (tp * islands),
                                                    section=section))
        losses = []
        for step in range(steps):
            _, loss = engine(*batch(island, step))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        out[f"z{stage}"] = {"losses": losses, "params": flat_params(model),
                            "dp_ranks": list(topo.dp_ranks),
                            "cross": list(topo.cross_island_ranks)}
    ref = ReducedSyncGPT(gpt_config(pattern=TP_PATTERN, tp_size=tp), EmulatedComm(tp))
    losses = diloco_workers(ref, list(range(0, world, world // islands)), steps, H,
                            lambda step: batch(island, step))
    if losses is not None:
        out["reference"] = {"losses": losses, "params": flat_params(ref)}


# -- Hugging Face Trainer, metrics -----------------------------------------------------
def scenario_trainer(rank: int, world: int, out: dict) -> None:
    """transformers.Trainer + DeepSpeed ZeRO-1 + SpdExtCallback on a small random-init
    GPT2LMHeadModel; then spd_ext's metrics through DeepSpeed's CSV monitor and the JSONL
    log of an engine of our own."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict:
            g = torch.Generator().manual_seed(i)
            x = torch.randint(0, VOCAB, (BLOCK,), generator=g)
            return {"input_ids": x, "labels": x}

    tmp = [tempfile.mkdtemp(prefix="spd_ext_ds_trainer_") if rank == 0 else None]
    dist.broadcast_object_list(tmp, src=0)
    # initializer_range 0.5 (not 0.02): the random model's predictions are far from uniform,
    # so the two ranks' losses, and hence their weights, differ clearly (with near-uniform
    # predictions both losses sit at ln(VOCAB) and the weights could land within 0.01 of 1/2);
    # seeded: the draw must not depend on what consumed the global generator before
    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=16,
                                       n_layer=2, n_head=2, initializer_range=0.5))
    ds = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
          "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 1},
          "spd_ext": {"signal_weighting": {**SIGNAL, "temperature": 0.01}}}
    args = TrainingArguments(output_dir=f"{tmp[0]}/hf", per_device_train_batch_size=4,
                             max_steps=4, deepspeed=ds, use_cpu=True, report_to=[],
                             logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens())
    trainer.add_callback(sd.SpdExtCallback(trainer))
    trainer.train()
    integration = trainer.model_wrapped.spd_ext
    out["trainer"] = {"attached": integration is not None, "last": integration.last,
                      "logged": [{k: v for k, v in h.items() if k.startswith("spd_ext/")}
                                 for h in trainer.state.log_history if "loss" in h]}
    # metrics: DeepSpeed's own monitor (CSV) and the JSONL log
    csv_dir = f"{tmp[0]}/csv"
    section = {"signal_weighting": SIGNAL, "metrics": {"jsonl": f"{tmp[0]}/spd_ext.jsonl"}}
    config = {**ds_config(0, section=section),
              "csv_monitor": {"enabled": True, "output_path": csv_dir, "job_name": "job"}}
    model = ReducedSyncGPT(gpt_config())
    engine, *_ = sd.initialize(model=model, model_parameters=model.parameters(), config=config)
    train_engine(engine, 3, rank)
    dist.barrier()
    out["csv"] = sorted(str(p.relative_to(csv_dir)) for p in Path(csv_dir).rglob("*.csv")) \
        if rank == 0 else []
    out["jsonl"] = Path(f"{tmp[0]}/spd_ext.jsonl").read_text().splitlines() if rank == 0 else []
    if rank == 0:
        weight0 = Path(csv_dir, "job", "spd_ext_weight_rank0.csv")
        out["csv_weight0"] = weight0.read_text().splitlines() if weight0.is_file() else []


# -- a NaN gradient with a finite loss ---------------------------------------------------
def scenario_nan_grad(rank: int, world: int, out: dict) -> None:
    from spd_ext.dp.aggregator import WeightError

    cases = {"z0": (0, None), "z1": (1, None), "z0_weighted_spd":
             (0, {"signal_weighting": SIGNAL, "comm": {"backend": "spd_ext"}})}
    for name, (stage, section) in cases.items():
        model = ReducedSyncGPT(gpt_config())
        engine, *_ = sd.initialize(model=model, model_parameters=model.parameters(),
                                   config=ds_config(stage, section=section))
        train_engine(engine, 1, rank)  # one good step
        before = flat_params(model)
        _, loss = engine(*batch(rank, 1))
        hook = None
        if rank == 1:  # the loss is finite; one gradient entry is not
            hook = next(model.parameters()).register_hook(
                lambda g: g.flatten().index_fill(0, torch.tensor([0]), float("nan")).view_as(g))
        try:  # DeepSpeed reduces inside backward at the boundary
            engine.backward(loss)
            engine.step()
            message = "no error"
        except WeightError as exc:
            message = str(exc)
        if hook is not None:
            hook.remove()
        out[name] = {"message": message, "loss": loss.item(),
                     "unchanged": flat_params(model) == before}


# -- skipped steps -----------------------------------------------------------------------
def scenario_skipped(rank: int, world: int, out: dict) -> None:
    """A step DeepSpeed skips: fp16's loss scaler on an overflow (rank 1's gradient holds
    inf at step 2), and ZeRO-2's check of a non-finite reduced gradient in bf16 (NaN)."""
    from spd_ext.dp.aggregator import WeightError

    allow_fp16_on_cpu()

    def inject(model, value: float):
        return next(model.parameters()).register_hook(
            lambda g: g.flatten().index_fill(0, torch.tensor([0]), value).view_as(g))

    dynamic = {"enabled": True, "initial_scale_power": 8, "hysteresis": 1}
    for stage in (0, 1, 2):
        model, engine = weighted_engine(stage, "fp16", 1, fp16=dynamic)
        integration = engine.spd_ext
        train_engine(engine, 2, rank)
        before = {"signal": integration.aggregator.state_dict(),
                  "applied": integration.applied_steps, "params": full_params(model)}
        hook = inject(model, float("inf")) if rank == 1 else None
        train_engine(engine, 1, rank, first=2)
        if hook is not None:
            hook.remove()
        skipped = {"applied": engine.was_step_applied(), "reported": integration.last["skipped"],
                   "weights": integration.last["weights"],
                   "signal_kept": plain(integration.aggregator.state_dict())
                   == plain(before["signal"]),
                   "count_kept": integration.applied_steps == before["applied"],
                   "params_kept": full_params(model) == before["params"]}
        train_engine(engine, 1, rank, first=3)
        skipped["next_applied"] = engine.was_step_applied()
        out[f"fp16_z{stage}"] = skipped
    model, engine = weighted_engine(2, "bf16", 1)
    train_engine(engine, 1, rank)
    before = full_params(model)
    hook = inject(model, float("nan")) if rank == 1 else None
    try:
        train_engine(engine, 1, rank, first=1)
        message = "no error"
    except WeightError as exc:
        message = str(exc)
    if hook is not None:
        hook.remove()
    out["bf16_z2_nan"] = {"message": message, "params_kept": full_params(model) == before}


# -- host synchronization -----------------------------------------------------------------
class HostReads:
    """Counts the host reads of tensor values made by spd_ext's own code: dispatches of
    ``aten._local_scalar_dense`` (what ``.item()``, ``float()``, ``bool()`` run) and calls
    of ``Tensor.tolist`` (which reads memory without a dispatch), each attributed to the
    innermost frame outside torch; only frames in the spd_ext package count (DeepSpeed's
    own step reads several values on CPU)."""

    def __init__(self) -> None:
        import os

        import spd_ext

        self.package = os.path.dirname(spd_ext.__file__) + os.sep
        self.torch = os.path.dirname(torch.__file__) + os.sep
        self.sites: list[str] = []

    def _note(self) -> None:
        import sys

        frame = sys._getframe(2)
        while frame is not None and (frame.f_code.co_filename.startswith(self.torch)
                                     or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename.startswith(self.package):
            where = frame.f_code.co_filename[len(self.package):]
            self.sites.append(f"{where}:{frame.f_lineno}")

    def __enter__(self) -> HostReads:
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        reads = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    reads._note()
                return func(*args, **(kwargs or {}))

        class Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is torch.Tensor.tolist:
                    reads._note()
                return func(*args, **(kwargs or {}))

        self._modes = [Dispatch(), Function()]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def scenario_host_sync(rank: int, world: int, out: dict) -> None:
    """The host reads spd_ext makes in a step that is not a metrics step, for each kind
    of engine at each stage it supports; then a NaN gradient on such a step, raised at the
    next metrics step."""
    from spd_ext.dp.aggregator import WeightError

    allow_fp16_on_cpu()
    quiet = {"metrics": {"interval": 1000}}
    weighting = {"signal_weighting": SIGNAL, **quiet}
    cases = {  # name -> (stage, section, extra ds_config, tp, dp)
        **{f"plain_z{z}": (z, dict(quiet), {}, 1, world) for z in (0, 1, 2, 3)},
        **{f"weighted_z{z}": (z, weighting, {}, 1, world) for z in (0, 1, 2, 3)},
        "weighted_z0_spd_ext": (0, {**weighting, "comm": {"backend": "spd_ext"}}, {}, 1,
                                world),
        "grad_norm_z1": (1, {**weighting, "signal_weighting": {
            **SIGNAL, "signal": "grad_norm_stability"}}, {}, 1, world),
        "cosine_z0": (0, {**weighting, "signal_weighting": {
            **SIGNAL, "signal": "cosine_to_prev_global"}}, {}, 1, world),
        "weighted_z2_bf16": (2, weighting, {"bf16": {"enabled": True}}, 1, world),
        "weighted_z3_fp16": (3, weighting, {"fp16": {"enabled": True, "loss_scale": 128}},
                             1, world),
        **{f"islands_z{z}": (z, {"staleness": {"mode": "diloco:2", "islands": world},
                                 **quiet}, {}, 1, 1) for z in (1, 2, 3)},
        **{f"tp_z{z}": (z, {"tensor_parallel": {"size": world, "pattern": TP_PATTERN},
                            **quiet}, {}, world, 1) for z in (0, 1, 2)},
    }
    # a NaN gradient on a step that is not a metrics step: raised at the next one (first:
    # DeepSpeed keeps the last mpu it was given, so engines with an mpu come last)
    model = ReducedSyncGPT(gpt_config())
    engine, *_ = sd.initialize(model=model, model_parameters=model.parameters(),
                               config=ds_config(0, section={"signal_weighting": SIGNAL,
                                                            "metrics": {"interval": 3}}))
    raised = []
    for index in range(3):
        hook = None
        if rank == 1 and index == 0:
            hook = next(model.parameters()).register_hook(
                lambda g: g.flatten().index_fill(0, torch.tensor([0]), float("nan")).view_as(g))
        try:
            _, loss = engine(*batch(rank, index))
            engine.backward(loss)
            engine.step()
        except WeightError as exc:
            raised.append([index, str(exc)])
        if hook is not None:
            hook.remove()
    out["deferred_nan"] = raised
    for name, (stage, section, extra, tp, dp) in cases.items():
        topo = sd.build_topology(tp)
        dtype = torch.float16 if "fp16" in extra else torch.float32
        if tp > 1:
            model = ReducedSyncGPT(gpt_config(pattern=TP_PATTERN, tp_size=tp),
                                   DistributedComm(topo.tp_group))
        else:
            model = ReducedSyncGPT(gpt_config())
        config = {**ds_config(stage, dp=dp, section=section), **extra}
        engine, *_ = sd.initialize(model=model.to(dtype), model_parameters=model.parameters(),
                                   config=config)
        dp_rank = rank % dp
        sites: list[str] = []
        for index in range(3):  # the first step's set-up (buffers, lazy state) is not counted
            with HostReads() as reads:
                _, loss = engine(*batch(dp_rank, index))
                engine.backward(loss)
                engine.step()
            if index:
                sites += reads.sites
        out[name] = sites


# -- set-ups refused once DeepSpeed's segments exist --------------------------------------
def scenario_refused(rank: int, world: int, out: dict) -> None:
    """Set-ups spd_ext refuses after deepspeed.init_distributed created this rank's 69 MB
    CPU all-reduce segment: the segment's name is gone from the first refusal on."""
    import os

    segment = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_"
                   f"{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank}")
    out["segment_before"] = segment.exists()
    errors: dict[str, str] = {}

    def refused(name: str, make) -> None:
        try:
            make()
            errors[name] = "accepted"
        except (ValueError, AssertionError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"

    def initialize(config: dict) -> None:
        model = ReducedSyncGPT(gpt_config())
        sd.initialize(model=model, model_parameters=model.parameters(), config=config)

    refused("tp_model", lambda: initialize(ds_config(dp=1, section={"tensor_parallel":
                                                                    {"size": 2}})))
    out["segment_after_first"] = segment.exists()
    refused("metrics", lambda: initialize(ds_config(section={"metrics": {
        "jsonl": "/proc/spd_ext/metrics.jsonl"}})))
    refused("cosine_zero1", lambda: initialize(ds_config(1, section={"signal_weighting": {
        "signal": "cosine_to_prev_global"}})))
    refused("batch", lambda: initialize(ds_config(dp=3)))  # DeepSpeed's own assertion
    refused("backend_on_gloo", lambda: initialize(ds_config(2, section={"comm": {
        "backend": "spd_ext"}})))  # this job's group is gloo's
    model = ReducedSyncGPT(gpt_config())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config())
    refused("attach_floor", lambda: sd.attach(engine, {"signal_weighting": {"floor": 0.9}}))
    out["errors"] = errors


# -- the torch.distributed backend "spd_ext" under ZeRO ----------------------------------
#: how main() set torch.distributed up: "gloo", "spd_ext" (init_distributed on the backend)
#: or "section" (left to spd_ext.deepspeed.initialize, the section's comm.backend choosing)
DIST_BACKEND = ["gloo"]
ZERO_CASES = {"zero1": (1, False), "zero2": (2, False), "zero3": (3, False),
              "zero2 bf16": (2, True), "zero3 bf16": (3, True)}


def scenario_zero_backend(rank: int, world: int, out: dict) -> None:
    """DeepSpeed's own ZeRO engines (plain deepspeed.initialize, or spd_ext's with only
    comm.backend set) on the job's backend: every rank's losses, and which collectives
    reached spd_ext's segment."""
    section = DIST_BACKEND[0] == "section"
    if not section:  # plain deepspeed.initialize leaves DeepSpeed's segment names behind
        sd.release_deepspeed_shm_name()
    for name, (stage, bf16) in ZERO_CASES.items():
        torch.manual_seed(0)
        model = ReducedSyncGPT(gpt_config())
        config = ds_config(stage, bf16=bf16,
                           section={"comm": {"backend": "spd_ext"}} if section else None)
        init = sd.initialize if section else deepspeed.initialize
        engine, *_ = init(model=model, model_parameters=model.parameters(), config=config)
        out[name] = train_engine(engine, 4, dist.get_rank())
        engine.destroy()
    group = dist.group.WORLD
    out["group"] = type(group).__name__
    out["backend"] = dist.get_backend()
    calls: dict[str, int] = {}  # over every group (DeepSpeed reduces on its own dp group)
    for pg in dist.distributed_c10d._world.pg_map:
        for collective, count in getattr(pg, "shm_calls", {}).items():
            calls[collective] = calls.get(collective, 0) + count
    out["shm_calls"] = calls


OUT_DIR: list[Path] = []  # the job's --out


# -- pipelines ----------------------------------------------------------------------
#: pipeline jobs: 4 blocks in 2 stages of 2 blocks ("blocks" partition). Both patterns put
#: something across the boundary: an open region (parallel) or a pending all-reduce (ladder)
PIPE_PATTERNS = {2: "tp,ladder,spd,palm", 4: "parallel,parallel,ladder,tp"}
PIPE_GAS, PIPE_STEPS = 2, 4


def pipe_batches(dp_rank: int, step: int) -> list[tuple]:
    return [batch(dp_rank, step, micro) for micro in range(PIPE_GAS)]


def pipe_engine(config: GPTConfig, dense: dict, dp: int, section: dict | None = None,
                recompute: bool = False, stage: int = 0, bf16: bool = False):
    pipe = sd.pipeline_module(config, num_stages=2, partition_method="blocks",
                              activation_checkpointing=recompute)
    pipe.load_dense_state_dict(dense)
    if bf16:
        pipe = pipe.to(torch.bfloat16)
    ds = ds_config(stage, gas=PIPE_GAS, dp=dp, section=section, bf16=bf16)
    ds["zero_allow_untested_optimizer"] = True  # SGD under ZeRO-1
    ds.pop("optimizer")
    engine, *_ = sd.initialize(model=pipe, optimizer=sgd(pipe.parameters()), config=ds)
    return pipe, engine


def pipe_reference(config: GPTConfig, dense: dict, dp: int, steps: int,
                   weighted: bool = False) -> dict:
    """The unpipelined model (emulated tensor parallelism) on every replica's micro-batches:
    g = sum_r w_r g_r, each g_r the mean over the replica's micro-batches, then clipping
    and SGD. w_r = 1/dp, or with ``weighted`` SIGNAL's weights: loss_ema of each replica's
    step loss, the step's weights decided from each signal as it would be after the step's
    first micro-batch (as weighting_reference)."""
    model = ReducedSyncGPT(config)
    model.load_dense_state_dict(dense)
    opt = sgd(model.parameters())
    signals = [make_signal("loss_ema") for _ in range(dp)]
    wmap = SoftmaxWeights(temperature=SIGNAL["temperature"], floor=SIGNAL["floor"],
                          warmup_steps=SIGNAL["warmup_steps"])
    losses, history = [], []
    for step in range(steps):
        grads, step_losses, firsts = [], [], []
        for r in range(dp):
            model.zero_grad(set_to_none=True)
            micro = []
            for x, y in pipe_batches(r, step):
                _, loss = model(x, y)
                (loss / PIPE_GAS).backward()
                micro.append(loss.item())
            step_losses.append(sum(micro) / PIPE_GAS)
            firsts.append(micro[0])
            grads.append([p.grad.clone() for p in model.parameters()])
        w = [1.0 / dp] * dp
        if weighted:
            estimates = []
            for signal, first in zip(signals, firsts):
                provisional = make_signal("loss_ema")
                provisional.load_state_dict(signal.state_dict())
                provisional.observe_loss(first)
                estimates.append(provisional.raw())
            w = wmap(torch.stack(estimates), step, signals[0].higher_is_better).tolist()
            for signal, loss in zip(signals, step_losses):
                signal.observe_loss(loss)
        for i, p in enumerate(model.parameters()):
            p.grad = sum(wr * g[i] for wr, g in zip(w, grads))
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(step_losses)
        history.append(w)
    return {"losses": losses, "weights": history,
            "params": flat_dense(model.dense_state_dict())}


def flat_dense(dense: dict) -> list[float]:
    return torch.cat([v.float().reshape(-1) for _, v in sorted(dense.items())]).tolist()


def train_pipe(engine, dp_rank: int, steps: int, first: int = 0) -> list[float]:
    losses = []
    for step in range(first, first + steps):
        losses.append(float(engine.train_batch(iter(pipe_batches(dp_rank, step)))))
    return losses


def pipe_generation(pipe) -> tuple[list, list]:
    """Greedy tokens of the trained pipeline (across its stages) and of the whole model
    with its gathered weights (emulated tensor parallelism)."""
    prompt = torch.randint(VOCAB, (2, 4), generator=torch.Generator().manual_seed(5))
    staged = pipe.generate(prompt, 6, temperature=0).tolist()
    whole = ReducedSyncGPT(pipe.config, seed=None)
    whole.load_dense_state_dict(pipe.dense_state_dict())
    return staged, whole.generate(prompt, 6, temperature=0).tolist()


def scenario_pipeline(rank: int, world: int, out: dict) -> None:
    """world 2: pp 2 (resume, offline conversion); world 4: pp 2 x tp 2 with every block
    recomputed, and pp 2 x dp 2 with signal weighting."""
    import spd_ext.deepspeed.pipeline as pipeline

    if world == 2:
        config = gpt_config(n_layer=4, pattern=PIPE_PATTERNS[2], bias=True)
        dense = ReducedSyncGPT(config).dense_state_dict()
        fresh = sd.pipeline_module(config, num_stages=2)  # seed 0: the whole model's init
        out["init"] = [flat_dense(fresh.dense_state_dict()), flat_dense(dense)]
        pipe, engine = pipe_engine(config, dense, dp=1)
        losses = train_pipe(engine, 0, 2)
        save = OUT_DIR[0] / "pipe_ckpt"
        engine.save_checkpoint(str(save))
        losses += train_pipe(engine, 0, PIPE_STEPS - 2, first=2)
        out["pp2"] = {"losses": losses, "params": flat_dense(pipe.dense_state_dict())}
        out["pp2"]["generated"], out["pp2"]["dense_generated"] = pipe_generation(pipe)
        # resume in a fresh engine: the same last steps
        pipe2, engine2 = pipe_engine(config, ReducedSyncGPT(config, seed=7).dense_state_dict(),
                                     dp=1)
        engine2.load_checkpoint(str(save))
        resumed = train_pipe(engine2, 0, PIPE_STEPS - 2, first=2)
        out["resumed"] = {"losses": resumed, "params": flat_dense(pipe2.dense_state_dict())}
        dist.barrier()
        if rank == 0:
            saved = pipeline.dense_state_dict_from_checkpoint(save, config)
            pipe_dense = flat_dense(saved)
            model = ReducedSyncGPT(config)
            model.load_dense_state_dict(saved)  # loads into the dense model
            out["offline"] = pipe_dense
            out["reference"] = pipe_reference(config, dense, 1, PIPE_STEPS)
            out["reference_at_2"] = pipe_reference(config, dense, 1, 2)["params"]
            out["pp2"]["dense_loaded"] = flat_dense(model.dense_state_dict())
        return
    config = gpt_config(n_layer=4, n_head=2, pattern=PIPE_PATTERNS[4], tp_size=2, bias=True)
    dense = ReducedSyncGPT(config).dense_state_dict()
    for recompute in (False, True):
        pipe, engine = pipe_engine(config, dense, dp=1, recompute=recompute)
        losses = train_pipe(engine, 0, PIPE_STEPS)
        syncs = engine.spd_ext.last
        out["tp2_recompute" if recompute else "tp2"] = {
            "losses": losses, "params": flat_dense(pipe.dense_state_dict()),
            "syncs": [syncs.get("syncs_forward"), syncs.get("syncs_backward"),
                      syncs.get("grad_syncs")]}
        if not recompute:
            out["tp2"]["generated"], out["tp2"]["dense_generated"] = pipe_generation(pipe)
    for stage, bf16 in ((1, False), (0, True), (1, True)):
        pipe, engine = pipe_engine(config, dense, dp=1, stage=stage, bf16=bf16)
        losses = train_pipe(engine, 0, PIPE_STEPS)
        out[f"tp2_z{stage}" + ("_bf16" if bf16 else "")] = {
            "losses": losses, "params": flat_dense(pipe.dense_state_dict()),
            "optimizer": type(engine.optimizer).__name__,
            "grad_syncs": engine.spd_ext.last.get("grad_syncs"),
            # this rank's own copies of the LayerNorms (replicated: equal on both shards)
            "layer_norms": torch.cat([p.detach().float().reshape(-1)
                                      for p in engine.spd_ext._partial]).tolist()}
    if rank == 0:
        out["tp2_reference"] = pipe_reference(config, dense, 1, PIPE_STEPS)
        model = ReducedSyncGPT(config)
        for x, y in pipe_batches(0, 0):  # one step's syncs: every micro-batch's
            _, loss = model(x, y)
            loss.backward()
        counts = model.sync_counter.step()
        out["tp2_reference"]["syncs"] = [counts["forward"], counts["backward"]]
    config = gpt_config(n_layer=4, pattern=PIPE_PATTERNS[2])
    dense = ReducedSyncGPT(config).dense_state_dict()
    pipe, engine = pipe_engine(config, dense, dp=2, section={"signal_weighting": SIGNAL,
                                                            "metrics": {"interval": 1},
                                                            "comm": {"backend": "spd_ext"}})
    dp_rank = (rank % 2)
    losses, weights = [], []
    for step in range(PIPE_STEPS):
        losses.append(float(engine.train_batch(iter(pipe_batches(dp_rank, step)))))
        weights.append(engine.spd_ext.last.get("weights"))
    out["weighted"] = {"losses": losses, "weights": weights,
                       "params": flat_dense(pipe.dense_state_dict())}
    if rank == 0:
        out["weighted_reference"] = pipe_reference(config, dense, 2, PIPE_STEPS, weighted=True)
    pipe_islands(rank, config, dense, out)


def pipe_islands(rank: int, config: GPTConfig, dense: dict, out: dict) -> None:
    """2 DiLoCo islands of pp 2 pipelines (ZeRO-1, AdamW); the reference: diloco:H with one
    worker per island (the whole model on the island's micro-batches)."""
    H, islands = 2, 2
    island = rank // 2
    pipe = sd.pipeline_module(config, num_stages=2, partition_method="blocks",
                              islands=islands)
    pipe.load_dense_state_dict(dense)
    section = {"staleness": {"mode": f"diloco:{H}", "islands": islands}}
    engine, *_ = sd.initialize(model=pipe, model_parameters=pipe.parameters(),
                               config=ds_config(1, gas=PIPE_GAS, dp=1, section=section))
    losses = [float(engine.train_batch(iter(pipe_batches(island, step))))
              for step in range(PIPE_STEPS)]
    out["islands"] = {"losses": losses, "params": flat_dense(pipe.dense_state_dict()),
                      "island": island, "cross": list(engine.spd_ext.topology.cross_island_ranks)}

    def island_batch(step: int) -> tuple:
        parts = pipe_batches(island, step)
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    ref = ReducedSyncGPT(config)
    ref.load_dense_state_dict(dense)
    ref_losses = diloco_workers(ref, [0, 2], PIPE_STEPS, H, island_batch)
    if ref_losses is not None:
        out["islands_reference"] = {"losses": ref_losses,
                                    "params": flat_dense(ref.dense_state_dict())}


SCENARIOS = {"weighting": scenario_weighting, "staleness": scenario_staleness,
             "resume": scenario_resume, "islands": scenario_islands, "tp": scenario_tp,
             "trainer": scenario_trainer, "nan_grad": scenario_nan_grad,
             "refused": scenario_refused, "skipped": scenario_skipped,
             "host_sync": scenario_host_sync, "tp_islands": scenario_tp_islands,
             "zero_backend": scenario_zero_backend, "pipeline": scenario_pipeline}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)
    parser.add_argument("--dist-backend", choices=("gloo", "spd_ext", "section"),
                        default="gloo")
    args = parser.parse_args()
    load_deepspeed_comm_op()  # as spd_ext's entry points do: a stale build lock never hangs
    DIST_BACKEND[0] = args.dist_backend
    OUT_DIR.append(Path(args.out))
    if args.dist_backend != "section":
        deepspeed.init_distributed(dist_backend={"gloo": "gloo", "spd_ext": "cpu:spd_ext"}[
            args.dist_backend], verbose=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out: dict = {}
    SCENARIOS[args.scenario](rank, world, out)
    path = Path(args.out) / f"{args.scenario}.rank{rank}.json"
    path.write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
