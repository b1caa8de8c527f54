"""Experiments and the TP benchmark, at toy scale (the real runs are CLI commands)."""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import spd_ext.launch
from spd_ext.cli import build_parser, main
from spd_ext.launch import RankError, spawn

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed not installed")


@pytest.fixture
def data_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPD_EXT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("First Citizen: before we proceed any further, hear me speak.\n" * 200)
    return corpus


def test_sync_sweep_trains_every_pattern_and_resumes(data_env, tmp_path, capsys) -> None:
    out = tmp_path / "sweep"
    argv = ["experiment", "sync-sweep", "--patterns", "tp*2;spd*2;[parallel,spd]",
            "--n-layer", "2", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
            "--steps", "6", "--batch-size", "4", "--eval-interval", "3", "--eval-batches", "2",
            "--data", str(data_env), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [r["pattern"] for r in results] == ["tp*2", "spd*2", "[parallel,spd]"]
    assert [r["syncs_fwd"] for r in results] == [4, 2, 1]
    assert all(r["val_loss"] > 0 for r in results)
    assert "tp*2" in printed and "syncs fwd" in printed
    assert (out / "tp_2" / "ckpt.pt").is_file()
    pytest.importorskip("matplotlib")
    assert (out / "sync_sweep.png").stat().st_size > 1000
    assert main(argv) == 0  # second run: everything already done
    assert "already in" in capsys.readouterr().out

    # The dense (tp*L) checkpoint feeds the sensitivity analysis.
    assert main(["tp", "sensitivity", "--checkpoint", str(out / "tp_2" / "ckpt.pt"),
                 "--data", str(data_env), "--eval-batches", "2", "--batch-size", "4"]) == 0
    table = capsys.readouterr().out
    assert "none (dense)" in table and "\n1 " in table


def test_sensitivity_refuses_bad_sources(data_env, tmp_path, capsys) -> None:
    assert main(["tp", "sensitivity", "--data", str(data_env)]) == 2
    assert "exactly one of --checkpoint" in capsys.readouterr().err
    assert main(["tp", "sensitivity", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_bench_tp_on_two_ranks(capsys) -> None:
    assert main(["bench", "tp", "--nproc", "2", "--patterns", "tp*2;spd*2", "--n-layer", "2",
                 "--n-embd", "16", "--n-head", "2", "--batch-size", "2", "--seq-len", "8",
                 "--repeats", "1", "--backends", "spd_ext"]) == 0
    out = capsys.readouterr().out
    assert "tp*2" in out and "spd*2" in out and "x most-sync step" in out


#: a GPT and a run small enough for a test of `bench deepspeed`
TINY_DS_BENCH = ["--nproc", "2", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
                 "--batch-size", "2", "--seq-len", "8", "--warmup", "1", "--steps", "2"]


@needs_deepspeed
def test_bench_deepspeed_on_two_ranks(capsys) -> None:
    assert main(["bench", "deepspeed", *TINY_DS_BENCH,
                 "--variants", "deepspeed,spd_ext-weighted"]) == 0
    out = capsys.readouterr().out
    assert "deepspeed " in out and "spd_ext-weighted" in out and "reduce best ms" in out
    assert main(["bench", "deepspeed", "--nproc", "1"]) == 2
    assert "--nproc must be at least 2" in capsys.readouterr().err
    assert main(["bench", "deepspeed", "--variants", "spd_ext,nccl"]) == 2
    assert "unknown variant(s) ['nccl']" in capsys.readouterr().err
    assert main(["bench", "deepspeed", "--stage", "2", "--variants", "spd_ext"]) == 2
    assert "need --stage 0" in capsys.readouterr().err


@needs_deepspeed
def test_bench_deepspeed_at_zero_3(capsys) -> None:
    assert main(["bench", "deepspeed", "--stage", "3", *TINY_DS_BENCH]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-3" in out and "deepspeed-weighted" in out and "step x its plain" in out
    rows = [line.split()[0] for line in out.splitlines()
            if line.startswith(("deepspeed", "spd_ext"))]
    assert rows == ["deepspeed", "deepspeed-weighted"]  # the fused variants need stage 0


def test_bench_ddp_hook_on_two_ranks(capsys) -> None:
    assert main(["bench", "ddp-hook", "--nproc", "2", "--n-layer", "1", "--n-embd", "16",
                 "--n-head", "2", "--batch-size", "2", "--seq-len", "8", "--warmup", "0",
                 "--steps", "2", "--bucket-mb", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "weighted-sync" in out and "x DDP default hook" in out
    assert main(["bench", "ddp-hook", "--variants", "weighted,allgather"]) == 2
    assert "unknown variant(s) ['allgather']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # refused by the flag's declared bounds
        main(["bench", "ddp-hook", "--bucket-mb", "0"])
    assert info.value.code == 2
    assert "argument --bucket-mb: must be a number > 0, got '0'" in capsys.readouterr().err


def test_tp_syncs_command(capsys) -> None:
    assert main(["tp", "syncs", "--pattern", "[spd,parallel]*6"]) == 0
    assert "7 forward and 7 backward" in capsys.readouterr().out
    assert main(["tp", "syncs", "--pattern", "[tp,sdp]*6"]) == 2
    assert "unknown block 'sdp'" in capsys.readouterr().err


def test_every_command_has_help(capsys) -> None:
    parser = build_parser()
    commands = [[], ["report"], ["bench"], ["bench", "allreduce"], ["bench", "reduce"],
                ["bench", "tp"], ["bench", "quant"], ["bench", "deepspeed"], ["bench", "ddp-hook"],
                ["tp"], ["tp", "syncs"], ["tp", "sensitivity"], ["clean"],
                ["experiment"], ["experiment", "sync-sweep"], ["experiment", "sadpt"],
                ["experiment", "staleness"]]
    for cmd in commands:
        with pytest.raises(SystemExit) as info:
            parser.parse_args([*cmd, "--help"])
        assert info.value.code == 0
        assert "usage: spd-ext" in capsys.readouterr().out

    def undocumented(p: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    missing += undocumented(child, f"{path} {name}")
            elif action.option_strings and not action.help:
                missing.append(f"{path} {action.option_strings[-1]}")
        return missing

    assert undocumented(parser, "spd-ext") == []  # every flag of every command says what it is

    def parsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        found = [p]
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    found += parsers(child)
        return found

    for p in parsers(parser):  # a usage line that lists subcommands lists them all
        for action in p._actions:
            lists = (action.metavar or "{").startswith("{")  # not a placeholder (COMMAND)
            if isinstance(action, argparse._SubParsersAction) and lists:
                usage = p.format_usage()
                assert all(name in usage for name in action.choices), (p.prog, usage)

    for p in parsers(parser):  # a default said in words is not followed by "(default: None)"
        text = "".join(p.format_help().split())  # wrapping may split a long word
        for action in p._actions:
            if action.help and "(default:" in action.help:
                said = "".join(action.help.split())
                assert said in text, (p.prog, said)
                assert not text.split(said, 1)[1].startswith("(default:"), (p.prog, said)


def test_sadpt_runs_and_records_weights(data_env, tmp_path, capsys) -> None:
    out = tmp_path / "sadpt"
    assert main(["experiment", "sadpt", "--runs", "iid_uniform,noniid_weighted", "--steps", "8",
                 "--warmup", "2", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
                 "--block-size", "16", "--batch-size", "4", "--eval-interval", "4",
                 "--eval-batches", "2", "--data", str(data_env), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results] == ["iid_uniform", "noniid_weighted"]
    uniform, weighted = results
    assert uniform["final_weights"] is None and uniform["corrupt_ranks"] == []
    assert weighted["corrupt_ranks"] == [1] and sum(weighted["final_weights"]) == pytest.approx(1)
    # The clean rank's lower loss must show in the weights (catches hook wiring mistakes).
    assert weighted["final_weights"][0] > 0.5 > weighted["final_weights"][1]
    assert [step for step, _ in weighted["weights"]] == sorted(step for step, _ in
                                                               weighted["weights"])
    assert "noniid_weighted" in printed and "clean val loss" in printed
    assert main(["experiment", "sadpt", "--runs", "nope", "--out", str(out)]) == 2
    assert "unknown run(s) ['nope']" in capsys.readouterr().err


def test_staleness_experiment_compares_modes(data_env, tmp_path, capsys) -> None:
    out = tmp_path / "staleness"
    assert main(["experiment", "staleness", "--modes", "ssgd,delayed:1,ssp:1,syncps",
                 "--tasks", "xor", "--straggler", "on", "--nproc", "3", "--xor-steps", "30",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    by_mode = {r["mode"]: r for r in results}
    assert set(by_mode) == {"ssgd", "delayed:1", "ssp:1", "syncps"}
    assert by_mode["delayed:1"]["staleness_max"] == 1 and by_mode["ssgd"]["staleness_max"] == 0
    assert by_mode["ssgd"]["messages_per_step"] == 1
    assert all(r["final_loss"] < 0.69 for r in results)  # below chance (log 2)
    assert "msgs/step" in capsys.readouterr().out
    log = [json.loads(line) for line in
           (out / "workers" / "xor_ssp1_straggler.jsonl").read_text().splitlines()]
    assert {entry.get("role", "worker") for entry in log} == {"server", "worker"}
    assert all("idle_fraction" in e for e in log if e.get("role") != "server")
    assert main(["experiment", "staleness", "--modes", "sgd", "--out", str(out)]) == 2
    assert "unknown staleness mode 'sgd'" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("SPD_EXT_DATA_DIR"),
                    reason="needs gpt2.tiktoken from SPD_EXT_DATA_DIR")
def test_sensitivity_of_a_local_hugging_face_model(data_env, tmp_path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tiktoken")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=64,
                                     vocab_size=50257)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "tiny-gpt2")
    assert main(["tp", "sensitivity", "--hf", str(tmp_path / "tiny-gpt2"), "--data",
                 str(data_env), "--eval-batches", "2", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "none (dense)" in out and "\n1 " in out


def test_bench_quant(capsys) -> None:
    assert main(["bench", "quant", "--sizes", "64K", "--dtype", "bf16", "--repeats", "1"]) == 0
    assert "quantize (torch) GB/s" in capsys.readouterr().out


def test_bench_allreduce_times_the_call_alone_after_a_gap(tmp_path, capsys) -> None:
    """--gap-us spaces the calls with busy compute, as a forward does; the time shown is
    the call's: well under the 50 ms gap on every path (the shared-memory kernel takes
    microseconds, gloo or a forced fallback milliseconds)."""
    out = tmp_path / "ar.json"
    assert main(["bench", "allreduce", "--impl", "gloo,spd_ext", "--sizes", "4K", "--dtype",
                 "fp32", "--repeats", "2", "--warmup", "1", "--target-ms", "10", "--gap-us",
                 "50000", "--json", str(out)]) == 0
    assert "every call follows 50000 us of busy compute" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["rows"]
    assert 0 < row["spd_ext"] < 25e-3 and 0 < row["gloo"] < 25e-3  # >= 50 ms if counted


def test_bench_allreduce_cuda_only_impls_need_cuda(capsys) -> None:
    assert main(["bench", "allreduce", "--impl", "spd_ext,spd_ext-graph", "--sizes", "4K"]) == 2
    assert "use them with --device cuda" in capsys.readouterr().err


def test_bad_inputs_get_one_line_before_anything_runs(tmp_path, capsys) -> None:
    """Each mistake is one line naming the problem and the fix, from argparse or the
    command, before data is read or ranks are spawned (no traceback)."""
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"model": ')
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model": {"pattern": "tp*12", "n_layr": 12}}))
    results = tmp_path / "out"
    results.mkdir()
    (results / "results.json").write_text("[{")
    cases = [
        (["tp", "syncs", "--pattern", "tp*12", "--tp-size", "0"],
         "argument --tp-size: must be an integer >= 1, got '0'"),
        (["tp", "syncs", "--pattern", "tp*12", "--n-head", "0"], "argument --n-head"),
        (["tp", "syncs", "--config", str(tmp_path)], "is not a file"),
        (["tp", "syncs", "--config", str(bad_json)], "bad.json is not valid JSON: line 1"),
        (["tp", "syncs", "--config", str(unknown)], "unknown model field 'n_layr'; did you "
                                                    "mean 'n_layer'?"),
        (["tp", "syncs", "--pattern", "tp*1000000000"], "gives 1000000000 blocks"),
        (["bench", "tp", "--repeats", "0"], "argument --repeats: must be an integer >= 1"),
        # counts that ran a whole benchmark (a negative warm-up) or failed deep inside one
        (["bench", "allreduce", "--repeats", "0"], "argument --repeats: must be an integer"),
        (["bench", "allreduce", "--warmup", "-1"], "argument --warmup: must be an integer >= 0"),
        (["bench", "allreduce", "--threads-per-rank", "0"], "argument --threads-per-rank"),
        (["bench", "reduce", "--repeats", "0"], "argument --repeats: must be an integer"),
        (["bench", "reduce", "--threads", "0"], "argument --threads: must be an integer"),
        (["bench", "quant", "--repeats", "-2"], "argument --repeats: must be an integer"),
        (["bench", "quant", "--block-size", "0"], "argument --block-size: must be an integer"),
        (["bench", "deepspeed", "--nproc", "-1"], "argument --nproc: must be an integer"),
        (["bench", "tp", "--backends", "torch,spd"], "'spd' is now called 'spd_ext'"),
        (["bench", "generate", "--new-tokens", "1"], "--new-tokens must be >= 2"),
        (["bench", "generate", "--patterns", "tp*12;spd*12;tp*12"], "tp*12 more than once"),
        (["bench", "allreduce", "--gap-us", "inf"],
         "argument --gap-us: must be a number in [0, 1e+06], got 'inf'"),
        (["bench", "allreduce", "--gap-us", "10", "--device", "cuda"], "--gap-us"),
        (["serve", "--hf", str(tmp_path), "--rank-timeout", "inf"], "argument --rank-timeout"),
        (["experiment", "sadpt", "--floor", "1.5"],
         "argument --floor: must be a number in [0, 1), got '1.5'"),
        (["experiment", "sadpt", "--floor", "0.4"], "--floor 0.4 leaves no room for 4 ranks"),
        (["experiment", "sadpt", "--signal", "los_ema"],
         "--signal 'los_ema' is not known; did you mean 'loss_ema'?"),
        (["experiment", "staleness", "--xor-steps", "-3"], "argument --xor-steps"),
        (["experiment", "staleness", "--xor-steps", "0"], "argument --xor-steps"),
        (["experiment", "sync-sweep", "--out", str(results), "--patterns", "tp*4",
          "--n-layer", "4"], "results.json is not valid JSON (line 1"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) if "argument" in message else nullcontext():
            code = main(argv)
            assert code == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        assert "Traceback" not in err


def test_a_defect_keeps_its_traceback(monkeypatch, capsys) -> None:
    """Only a UsageError (a mistake in what was asked) becomes one line and exit 2; a
    ValueError or KeyError from inside spd_ext is a defect and must not be disguised as the
    user's mistake."""
    import spd_ext.cli.maintenance
    from spd_ext.errors import UsageError

    for defect in (KeyError("n_layer"), ValueError("math domain error"),
                   FileNotFoundError("/tmp/x.so")):
        def broken(args, defect=defect):
            raise defect

        monkeypatch.setattr(spd_ext.cli.maintenance, "clean", broken)
        with pytest.raises(type(defect)):
            main(["clean"])

    def mistake(args):
        raise UsageError("--foo 3 is too many; pass at most 2")

    monkeypatch.setattr(spd_ext.cli.maintenance, "clean", mistake)
    assert main(["clean"]) == 2
    assert capsys.readouterr().err == "spd-ext: error: --foo 3 is too many; pass at most 2\n"


def _deepspeed_segment(port: int | str, rank: int | str) -> Path:
    """The /dev/shm name DeepSpeed's CPU comm op gives rank ``rank`` of a spawn job
    (rank "*": a pattern for every rank's)."""
    return Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}")


@pytest.fixture
def job_segments(monkeypatch):
    """The DeepSpeed segments of the spawn jobs a test starts (their ports recorded as
    spawn picks them): the test reads what they left, the teardown removes it."""
    ports: list[int] = []
    pick = spd_ext.launch.free_port

    def recorded() -> int:
        ports.append(pick())
        return ports[-1]

    monkeypatch.setattr(spd_ext.launch, "free_port", recorded)

    def left() -> list[str]:
        return sorted(p for port in ports for p in glob.glob(str(_deepspeed_segment(port, "*"))))

    yield left
    for path in left():
        os.unlink(path)


@needs_deepspeed
def test_bench_allreduce_leaves_no_deepspeed_segments(job_segments, capsys) -> None:
    """DeepSpeed's CPU comm op creates a 66 MiB /dev/shm segment per rank and never unlinks
    it; the benchmark releases the names once every rank has mapped every segment."""
    assert main(["bench", "allreduce", "--impl", "deepspeed,spd_ext", "--sizes", "4K",
                 "--dtype", "fp32", "--repeats", "1", "--warmup", "1", "--target-ms",
                 "1"]) == 0
    assert "spd_ext x ds" in capsys.readouterr().out
    assert job_segments() == []


def _peer_gone_before_the_release(rank: int, world: int) -> None:
    import torch.distributed as dist

    from spd_ext.bench.deepspeed_comm import release_deepspeed_segments

    mine = _deepspeed_segment(os.environ["MASTER_PORT"], rank)  # as init_distributed makes
    mine.write_bytes(b"\0" * 4096)
    dist.barrier()
    if rank == 0:
        release_deepspeed_segments()  # raises: rank 1 is gone
        return
    dist.destroy_process_group()  # gone before the release: its connections close
    deadline = time.monotonic() + 20  # until rank 0 has removed the names, so spawn stops
    while mine.exists() and time.monotonic() < deadline:  # no rank before it is done
        time.sleep(0.05)
    raise RuntimeError("rank 1 left before the release")


def test_deepspeed_segments_go_when_a_peer_fails_before_the_release(job_segments) -> None:
    with pytest.raises(RankError):
        spawn(_peer_gone_before_the_release, 2, timeout=120)
    assert job_segments() == []
