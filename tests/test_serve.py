"""spd-ext serve: a real server on 127.0.0.1 with 2 CPU ranks (streaming, concurrency, bad
input, a client that disconnects, a rank that dies, shutdown) and its page in Chromium."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from spd_ext.data.tokenizers import CharTokenizer
from spd_ext.launch import free_port
from spd_ext.serve.messages import Done, Ready
from spd_ext.serve.options import ServeOptions
from spd_ext.tp import GPTConfig, ReducedSyncGPT

pytest.importorskip("aiohttp")

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me!\n"


def write_checkpoint(path: Path, block_size: int = 512) -> Path:
    tok = CharTokenizer.from_text(TEXT)
    cfg = GPTConfig(block_size=block_size, vocab_size=tok.vocab_size, n_layer=4, n_head=4,
                    n_embd=32, pattern="[parallel,spd]*2", tp_size=1)
    model = ReducedSyncGPT(cfg, seed=0)
    torch.save({"model": model.dense_state_dict(), "model_config": cfg.to_dict(),
                "tokenizer": tok.state()}, path)
    return path


def greedy_tokens(prompt: str, tokens: int) -> list[int]:
    """write_checkpoint's model (emulated tensor parallel 2, as the servers run it): the
    greedy tokens after ``prompt``."""
    tok = CharTokenizer.from_text(TEXT)
    model = ReducedSyncGPT(GPTConfig(block_size=512, vocab_size=tok.vocab_size, n_layer=4,
                                     n_head=4, n_embd=32, pattern="[parallel,spd]*2",
                                     tp_size=2), seed=0)
    ids = tok.encode(prompt)
    return model.generate(torch.tensor([ids]), tokens, temperature=0)[0, len(ids):].tolist()


class Server:
    def __init__(self, checkpoint: Path, *extra: str, start_new_session: bool = False) -> None:
        self.port = free_port()
        self.model = str(checkpoint)  # the name OpenAI's "model" fields give
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spd_ext.cli", "serve", "--checkpoint", str(checkpoint),
             "--nproc", "2", "--port", str(self.port), "--fail-grace", "1", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=start_new_session)
        # the log, read as it comes: a test can look at it while the server runs
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.reader.join(10)
                raise AssertionError(f"the server exited: {self.log}")
            try:
                status, body = self.get("/health")
                if status == 200:
                    self.pids = [r["pid"] for r in body["ranks"]]
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError("the server did not become healthy within 90 s")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def post(self, body: object, raw: bytes | None = None, path: str = "/v1/completions"
             ) -> tuple[int, dict]:
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stream(self, body: dict, keep: int | None = None) -> list[dict | str]:
        """The stream's `data:` items (chunks, then "[DONE]"); with ``keep``, hang up after
        that many tokens."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("text/event-stream")
        items: list[dict | str] = []
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                items.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                if keep is not None and len(tokens(items)) >= keep:
                    response.close()
                    conn.sock.close()  # the client goes away mid-stream
                    return items
        conn.close()
        return items

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.reader.join(10)
            raise AssertionError(f"the server outlived {timeout} s after signal {sig}:\n"
                                 f"{self.log}") from None
        self.reader.join(10)
        return self.proc.returncode, self.log


def tokens(items: list[dict | str]) -> list[dict]:
    """A stream's tokens: each token's chunk's "spd_ext" fields, with its text."""
    return [{**c["spd_ext"], "text": c["choices"][0]["text"]} for c in items
            if isinstance(c, dict) and c.get("choices") and
            c["choices"][0]["finish_reason"] is None]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(write_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt.pt"))
    yield s
    code, out = s.stop()
    assert code == 0, out
    assert not any(alive(p) for p in s.pids), "a rank outlived the server"


def test_completion_equals_the_model_and_streams_the_same_tokens(server) -> None:
    status, whole = server.post({"prompt": "ROMEO:", "max_tokens": 12, "temperature": 0})
    assert status == 200, whole
    tok = CharTokenizer.from_text(TEXT)
    expected = greedy_tokens("ROMEO:", 12)
    # OpenAI's completion object; spd_ext's own fields under "spd_ext"
    assert whole["id"].startswith("cmpl-") and whole["object"] == "text_completion"
    assert isinstance(whole["created"], int) and whole["model"] == server.model
    assert whole["choices"] == [{"text": tok.decode(expected), "index": 0, "logprobs": None,
                                 "finish_reason": "length"}]
    assert whole["usage"] == {"prompt_tokens": 6, "completion_tokens": 12, "total_tokens": 18}
    extras = whole["spd_ext"]
    assert extras["token_ids"] == expected  # the distributed server == the emulated model
    assert extras["syncs_per_token"] == 2 and extras["timing"]["prefill_ms"] > 0
    items = server.stream({"prompt": "ROMEO:", "max_tokens": 12, "temperature": 0})
    assert items[-1] == "[DONE]"
    chunks = items[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] != whole["id"]
               and c["model"] == server.model for c in chunks)
    streamed = tokens(items)
    assert [e["index"] for e in streamed] == list(range(12))
    assert [e["token"] for e in streamed] == expected
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert all(e["syncs"] == 2 and e["latency_ms"] > 0 for e in streamed)
    assert [e["positions"] for e in streamed] == [6] + [1] * 11
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["spd_ext"]["token_ids"] == expected and "usage" not in chunks[-1]
    # stream_options.include_usage: "usage": null on every chunk, then one with the usage
    items = server.stream({"prompt": "ROMEO:", "max_tokens": 3, "temperature": 0,
                           "stream_options": {"include_usage": True}})
    assert [c["usage"] for c in items[:-2]] == [None] * 4
    assert items[-2]["choices"] == [] and items[-2]["usage"]["total_tokens"] == 9
    status, metrics = server.get("/metrics")
    assert status == 200 and metrics["completed"] >= 3 and metrics["syncs_per_token"] == 2
    assert metrics["decode_ms_p50"] > 0 and metrics["tokens_per_s"] > 0
    assert server.get("/v1/models")[1]["data"][0]["id"] == server.model
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=10) as r:
        assert b"/v1/completions" in r.read()


def test_pipeline_stages_serve_the_whole_models_tokens(tmp_path) -> None:
    """--pp 2 on 4 ranks: two stages of two blocks, each tensor-parallel 2; greedy tokens
    equal the whole model's at tensor parallel 2, with its syncs per token (every
    stage's)."""
    s = Server(write_checkpoint(tmp_path / "ckpt.pt"), "--nproc", "4", "--pp", "2")
    try:
        status, whole = s.post({"prompt": "JULIET:", "max_tokens": 10, "temperature": 0})
        health = s.get("/health")[1]
    finally:
        code, out = s.stop()
    assert code == 0, out
    assert status == 200, whole
    assert whole["spd_ext"]["token_ids"] == greedy_tokens("JULIET:", 10)
    assert whole["spd_ext"]["syncs_per_token"] == 2
    assert "pipeline stages 2" in out and "4 ranks" in out, out
    assert (health["tp_size"], health["pp"], len(health["ranks"])) == (2, 2, 4)
    assert not any(alive(p) for p in s.pids)


def test_openai_client(server) -> None:
    """The `openai` package (the client vLLM's recipes use) talks to the server, streamed
    and not, and reads its errors."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none",
                           timeout=60, max_retries=0)
    model = client.models.list().data[0].id
    whole = client.completions.create(model=model, prompt="ROMEO:", max_tokens=8,
                                      temperature=0, seed=1, n=1, echo=False, top_p=1)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 8
    expected = server.post({"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0})[1]
    assert whole.choices[0].text == expected["choices"][0]["text"]
    assert whole.model_extra["spd_ext"]["token_ids"] == expected["spd_ext"]["token_ids"]
    chunks = list(client.completions.create(model=model, prompt="ROMEO:", max_tokens=8,
                                            temperature=0, stream=True,
                                            extra_body={"top_k": 5}))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="unsupported: n=2"):
        client.completions.create(model=model, prompt="ROMEO:", max_tokens=8, n=2)


def test_concurrent_requests_are_never_mixed(server) -> None:
    prompts = ["ROMEO:", "JULIET:", "But soft", "Ay me"]
    body = {"max_tokens": 40, "temperature": 0}
    alone = {p: server.post({"prompt": p, **body})[1]["spd_ext"]["token_ids"] for p in prompts}
    results: dict[str, list] = {}

    def ask(p: str, stream: bool) -> None:
        if stream:
            results[p + "/stream"] = [e["token"] for e in tokens(server.stream(
                {"prompt": p, **body}))]
        else:
            results[p] = server.post({"prompt": p, **body})[1]["spd_ext"]["token_ids"]

    threads = [threading.Thread(target=ask, args=(p, s)) for p in prompts for s in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for p in prompts:
        assert results[p] == alone[p] and results[p + "/stream"] == alone[p], p


@pytest.mark.parametrize("body, message", [
    ({"prompt": ""}, "prompt must be a non-empty string"),
    ({"max_tokens": 3}, "prompt must be a non-empty string, or a non-empty list of token"),
    ({"prompt": ["RO", "JU"]}, "a batch of 2 prompts"),
    ({"prompt": [1, 99999]}, r"unknown token id\(s\) \[99999\]"),
    ({"prompt": [1, "a"]}, "list of token ids"),
    ({"prompt": "R" * 513}, "context is 512"),
    ({"prompt": "ROMEO", "max_tokens": 600}, r"max_tokens must be an integer in \[1, 512\]"),
    ({"prompt": "ROMEO", "max_tokens": 509}, "ask for at most 508 tokens"),
    ({"prompt": "ROMEO", "temperature": -1}, "temperature must be"),
    ({"prompt": "ROMEO", "top_k": 0}, "top_k must be"),
    ({"prompt": "ROMEO", "stream": "yes"}, "stream must be"),
    ({"prompt": "ROMEO", "stream_options": {"include_usage": True}}, "with stream true"),
    ({"prompt": "ROMEO", "model": 3}, "model must be a string"),
    ({"prompt": "ROMEO", "tempreature": 1}, r"unknown field\(s\) \['tempreature'\]"),
    ({"prompt": "ROMEO", "n": 2, "stop": ["\n"], "logprobs": 0, "echo": True},
     r"unsupported: n=2, echo=True, logprobs=0, stop=\['\\n'\]"),
    ({"prompt": "ROMEO\u00e9"}, "cannot be tokenized"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_requests_get_a_400_that_says_what_is_wrong(server, body, message) -> None:
    import re

    status, reply = server.post(body)
    error = reply["error"]  # OpenAI's error object
    assert status == 400 and re.search(message, error["message"]), reply
    assert error["type"] == "invalid_request_error" and error["code"] == 400


def test_openai_defaults_and_nulls_are_accepted(server) -> None:
    """What OpenAI clients send for "the default" (nulls, n 1, echo false, a prompt as a
    batch of one or as token ids) is accepted and changes nothing."""
    tok = CharTokenizer.from_text(TEXT)
    plain = server.post({"prompt": "ROMEO", "max_tokens": 5, "temperature": 0})[1]
    for extra in ({"prompt": ["ROMEO"]}, {"prompt": tok.encode("ROMEO")},
                  {"prompt": [tok.encode("ROMEO")]},
                  {"model": "anything", "n": 1, "best_of": None, "echo": False, "stop": None,
                   "logprobs": None, "top_p": 1.0, "presence_penalty": 0, "user": "me",
                   "frequency_penalty": 0.0, "logit_bias": {}, "suffix": None,
                   "seed": None, "top_k": None, "stream": None}):
        status, reply = server.post({"prompt": "ROMEO", "max_tokens": 5, "temperature": 0,
                                     **extra})
        assert status == 200 and reply["choices"] == plain["choices"], (extra, reply)
    status, fit = server.post({"prompt": "ROMEO"}, path="/tokenize")
    assert status == 200 and fit == {"count": 5, "max_model_len": 512, "max_tokens": 508,
                                     "tokens": tok.encode("ROMEO")}
    status, fit = server.post({"prompt": "R" * 513}, path="/tokenize")
    assert status == 400 and "context is 512" in fit["error"]["message"]


def test_max_tokens_defaults_to_what_fits_a_small_context() -> None:
    """Without max_tokens a request asks for up to 64 tokens, or as many as the context
    leaves (a small model's 16 positions), rather than a 400 about a field never sent."""
    from spd_ext.serve.app import parse_request

    tok = CharTokenizer.from_text(TEXT)
    assert parse_request({"prompt": "ROMEO"}, tok, context=512, vocab=tok.vocab_size) \
        .max_tokens == 64
    assert parse_request({"prompt": "ROMEO"}, tok, context=16, vocab=tok.vocab_size) \
        .max_tokens == 12  # the last new token is never fed back: 5 + 12 - 1 positions


@pytest.mark.parametrize("temperature", [1e-40, 1e-300])
def test_a_tiny_temperature_is_answered_not_fatal(server, temperature) -> None:
    """A temperature that passes the request checks but is tiny (1e-40) or 0 in float32
    (1e-300, issue 29) used to make NaN probabilities and stop the server: every client
    got 503 and it exited 1. Now it samples the greedy tokens, and the server goes on."""
    body = {"prompt": "ROMEO", "max_tokens": 4}
    status, tiny = server.post({**body, "temperature": temperature})
    assert status == 200, tiny
    greedy = server.post({**body, "temperature": 0})[1]
    assert tiny["spd_ext"]["token_ids"] == greedy["spd_ext"]["token_ids"]
    assert server.get("/health")[1]["status"] == "ok"


@pytest.mark.parametrize("raw, message", [
    (b"{not json", "not valid JSON"),
    (b"[" * 300_000 + b"]" * 300_000, "nests arrays or objects too deeply"),  # RecursionError
    (b'{"prompt": "ROMEO", "seed": ' + b"7" * 5000 + b"}", "integer string conversion"),
])
def test_malformed_json_is_a_400(server, raw, message) -> None:
    status, reply = server.post(None, raw=raw)
    assert status == 400 and message in reply["error"]["message"], reply


def test_a_client_that_disconnects_does_not_disturb_others(server) -> None:
    """The others are answered in full, the abandoned generation stops, and the log says
    so in one line (it was aiohttp's traceback of ClientConnectionResetError, each time)."""
    before, logged = server.get("/metrics")[1], len(server.lines)
    other: dict = {}

    def ask() -> None:
        other["reply"] = server.post({"prompt": "JULIET:", "max_tokens": 20, "temperature": 0})

    items = server.stream({"prompt": "ROMEO:", "max_tokens": 500, "temperature": 0}, keep=3)
    assert len(tokens(items)) == 3
    thread = threading.Thread(target=ask)
    thread.start()
    thread.join(60)
    assert other["reply"][0] == 200, other
    assert len(other["reply"][1]["spd_ext"]["token_ids"]) == 20
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = server.get("/metrics")[1]
        if after["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.2)
    assert after["cancelled"] == before["cancelled"] + 1
    # the abandoned generation stopped early instead of running to 500 tokens
    assert after["tokens"] - before["tokens"] < 500
    time.sleep(0.5)  # the log line is printed before the metrics change; let it arrive
    new = server.lines[logged:]
    assert len(new) == 1 and "the client went away; its generation stops" in new[0], new


def test_an_idle_server_outlives_its_ranks_timeout(tmp_path) -> None:
    """The other ranks wait for the next request inside a collective; an idle first rank
    keeps that wait inside the process group's timeout (it used to be 30 days, after which
    an idle server stopped)."""
    s = Server(write_checkpoint(tmp_path / "ckpt.pt"), "--rank-timeout", "4")
    try:
        time.sleep(10)
        status, reply = s.post({"prompt": "ROMEO:", "max_tokens": 4, "temperature": 0})
        assert status == 200 and reply["usage"]["completion_tokens"] == 4, reply
        assert s.get("/health")[1]["status"] == "ok"
    finally:
        code, out = s.stop()
    assert code == 0, out


def test_a_dead_rank_gets_503_and_every_rank_exits(tmp_path) -> None:
    s = Server(write_checkpoint(tmp_path / "ckpt.pt"))
    before = set(os.listdir("/dev/shm"))
    os.kill(s.pids[1], signal.SIGKILL)
    deadline = time.monotonic() + 15
    status, reply = 0, {}
    while time.monotonic() < deadline:
        try:
            status, reply = s.post({"prompt": "ROMEO:", "max_tokens": 4})
        except OSError:
            break
        if status == 503:
            break
        time.sleep(0.1)
    assert status == 503 and "rank 1" in reply["error"]["message"], reply
    code, out = s.stop(signal.SIGCONT, timeout=30)  # it exits by itself after the grace
    assert code == 1 and "rank 1" in out, out
    assert not any(alive(p) for p in s.pids)
    assert not {n for n in set(os.listdir("/dev/shm")) - before if "spd" in n}


def test_a_request_that_fails_on_a_rank_fails_alone(tmp_path) -> None:
    """A model whose weights went NaN makes sampling raise on the first rank mid-generation
    (the others are in the step's all-reduce): that request gets a 500 naming the cause,
    streamed or not, and the ranks go on (greedy requests still run). Then, with a rank
    stopped (SIGSTOP) and a request stuck, the first SIGTERM waits for the queue, the
    second stops the server at once: exit 1, every rank gone."""
    ckpt = write_checkpoint(tmp_path / "ckpt.pt")
    state = torch.load(ckpt, weights_only=True)
    state["model"]["ln_f.weight"].fill_(float("nan"))
    torch.save(state, ckpt)
    s = Server(ckpt)
    try:
        sampled = {"prompt": "ROMEO:", "max_tokens": 4, "temperature": 1.0}
        status, reply = s.post(sampled)
        assert status == 500, reply
        assert "rank 0: RuntimeError: probability tensor" in reply["error"]["message"]
        items = s.stream(sampled)
        assert items[-2]["error"]["code"] == 500 and items[-1] == "[DONE]", items
        status, reply = s.post({**sampled, "temperature": 0})
        assert status == 200 and reply["usage"]["completion_tokens"] == 4, reply
        assert s.get("/health")[1]["status"] == "ok"
        assert s.get("/metrics")[1]["failed"] == 2
        os.kill(s.pids[1], signal.SIGSTOP)
        stuck: dict = {}
        thread = threading.Thread(target=lambda: stuck.update(reply=s.post(sampled)))
        thread.start()
        time.sleep(1)
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while s.get("/health")[1]["status"] != "stopping" and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # a signal right after the first is the same one sent twice (timeout)
        assert s.proc.poll() is None  # the first signal waits for the queue
    finally:
        code, out = s.stop(signal.SIGTERM, timeout=15)  # the second stops at once
    thread.join(15)
    assert code == 1 and "second signal" in out, out
    assert stuck["reply"][0] == 503, stuck
    assert not any(alive(p) for p in s.pids)


def test_a_stalled_rank_is_the_one_named(tmp_path) -> None:
    """Rank 1 stops answering (SIGSTOP): rank 0's collective times out after
    --rank-timeout, and the 503 names rank 1, not rank 0 (the healthy one, which the
    server used to blame, with no reason)."""
    s = Server(write_checkpoint(tmp_path / "ckpt.pt"), "--rank-timeout", "3")
    os.kill(s.pids[1], signal.SIGSTOP)
    try:
        status, reply = s.post({"prompt": "ROMEO:", "max_tokens": 4, "temperature": 0})
    finally:
        code, out = s.stop(signal.SIGCONT, timeout=30)  # it exits by itself
    message = reply["error"]["message"]
    assert status == 503 and "rank 1" in message, reply
    assert "stopped answering" in message and "rank 0 timed out" in message
    assert code == 1, out
    assert not any(alive(p) for p in s.pids)


def silent_job(pids: list[int]) -> type:
    """A RankJob whose ranks (``pids``) say ready and then nothing, and whose launcher
    thread never reports: the front end alone, in this process."""

    class SilentJob:
        def __init__(self, *args, **kwargs) -> None:
            self.loop, self.on_message = args[4], args[5]
            self.thread = threading.Thread(target=lambda: None)
            self.sent: list = []

        def start(self) -> None:
            self.thread.start()
            self.loop.call_soon(self.on_message, Ready(pids))

        def ready(self) -> None:
            pass

        def send(self, message: Any) -> None:
            self.sent.append(message)

    return SilentJob


def test_stopping_with_ranks_gone_exits_1_within_the_grace(tmp_path, monkeypatch) -> None:
    """Issue 29: whatever the launcher's thread is doing (here: it never reports), a
    SIGINT/SIGTERM with a rank gone ends the server within --fail-grace with exit 1; it
    used to stay 'stopping' for good, waiting for ranks that had exited."""
    import asyncio

    from spd_ext.serve import app, inspect_source

    source = inspect_source(str(write_checkpoint(tmp_path / "ckpt.pt")), None, None, 2)
    gone = subprocess.Popen(["true"])  # exits at once; left uncollected: a zombie
    running = subprocess.Popen(["sleep", "60"])

    monkeypatch.setattr(app, "RankJob", silent_job([running.pid, gone.pid]))

    async def stop_it() -> tuple[int, float, dict]:
        server = app.CompletionServer(source, ServeOptions(fail_grace_s=0.5))
        server.start_ranks()
        while server.state != "ready":
            await asyncio.sleep(0.01)
        time.sleep(0.2)  # `true` has exited
        health = await server.health(None)
        began = time.monotonic()
        server.stop()
        await asyncio.wait_for(server.finished.wait(), 5)
        return server.exit_code, time.monotonic() - began, json.loads(health.text)

    try:
        code, took, health = asyncio.run(stop_it())
    finally:
        running.kill()
        running.wait()
        gone.wait()
    assert [r["alive"] for r in health["ranks"]] == [True, False]
    assert code == 1 and took < 1.5, (code, took)


def test_metrics_count_bad_requests_and_a_full_queue_apart(tmp_path, monkeypatch) -> None:
    """/metrics' `bad_requests` counts 400s, `queue_full` the 503s of a full queue (400s
    were counted as `refused`, a name that suggests the queue's refusals, which were not
    counted at all). The front end alone, with ranks that never answer: the first request
    stays queued."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from spd_ext.serve import app, inspect_source

    source = inspect_source(str(write_checkpoint(tmp_path / "ckpt.pt")), None, None, 2)
    monkeypatch.setattr(app, "RankJob", silent_job([]))

    async def scenario() -> tuple[dict, list[int], dict]:
        server = app.CompletionServer(source, ServeOptions(max_queue=1))
        server.start_ranks()
        while server.state != "ready":
            await asyncio.sleep(0.01)
        async with TestClient(TestServer(server.app())) as client:
            body = {"prompt": "ROMEO", "max_tokens": 2}
            held = asyncio.create_task(client.post("/v1/completions", json=body))
            while not server.streams:
                await asyncio.sleep(0.01)
            statuses = []
            for request in (body, {"prompt": ""}, {"prompt": "ROMEO", "n": 3}, body):
                async with client.post("/v1/completions", json=request) as r:
                    statuses.append(r.status)
            async with client.get("/metrics") as r:
                metrics = await r.json()
            server._on_message(Done(next(iter(server.streams)), "length"))
            async with await held as r:
                return metrics, statuses, await r.json()

    metrics, statuses, held = asyncio.run(scenario())
    assert statuses == [503, 400, 400, 503]
    assert (metrics["requests"], metrics["bad_requests"], metrics["queue_full"]) == (1, 2, 2)
    assert "refused" not in metrics
    assert held["choices"][0]["finish_reason"] == "length"


def test_ctrl_c_to_the_whole_process_group_stops_cleanly(tmp_path) -> None:
    """A terminal's Ctrl-C (or `timeout`) signals every process of the group; the ranks
    must not die of it: the front end stops them in order and exits 0. `timeout` also
    signals its child directly: the same signal twice, which is not a second one."""
    s = Server(write_checkpoint(tmp_path / "ckpt.pt"), start_new_session=True)
    assert s.post({"prompt": "ROMEO:", "max_tokens": 4})[0] == 200
    os.kill(s.proc.pid, signal.SIGINT)
    os.killpg(s.proc.pid, signal.SIGINT)
    code, out = s.stop(signal.SIGCONT, timeout=30)
    assert code == 0, out
    assert not any(alive(p) for p in s.pids)


def edited(ckpt: Path, entry: str, **fields: object) -> Path:
    """A copy of ``ckpt`` with ``fields`` set in its ``entry`` (all of them dropped when
    none are given)."""
    state = torch.load(ckpt, weights_only=True)
    state[entry] = {**state[entry], **fields} if fields else {}
    path = ckpt.with_name(f"{entry}-{len(list(ckpt.parent.iterdir()))}.pt")
    torch.save(state, path)
    return path


def test_bad_launch_arguments_are_one_line_before_any_rank(tmp_path) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt.pt", block_size=64)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt")], "no checkpoint at"),
        (["--checkpoint", str(garbage)], "is not a readable checkpoint"),
        (["--checkpoint", str(ckpt), "--pattern", "spd*3"], "gives 3 blocks"),
        (["--checkpoint", str(ckpt), "--nproc", "3"], "divisible by tp_size"),
        (["--checkpoint", str(ckpt), "--nproc", "3", "--pp", "2"], "not a multiple of --pp 2"),
        (["--checkpoint", str(ckpt), "--nproc", "5", "--pp", "5"],
         "--pp 5 is more stages than the model's 4 blocks"),
        (["--hf", str(tmp_path)], "no Hugging Face model folder"),
        # weights that do not fit the model_config: a traceback once the ranks had started;
        # a block_size of 1e9 tried to allocate 64 GB
        (["--checkpoint", str(edited(ckpt, "model_config", block_size=10**9))],
         "its weight wpe.weight is (64, 32) but the model its model_config describes"),
        (["--checkpoint", str(edited(ckpt, "model_config", n_layer=2, pattern="spd*2"))],
         "its weights do not fit the model its model_config describes"),
        (["--checkpoint", str(edited(ckpt, "tokenizer"))], "its tokenizer {} is not one "),
    ]
    procs = [subprocess.Popen([sys.executable, "-m", "spd_ext.cli", "serve", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args, _ in cases]  # all at once: each is mostly Python and torch starting
    try:
        for (args, message), proc in zip(cases, procs):
            _, stderr = proc.communicate(timeout=90)
            assert proc.returncode == 2 and message in stderr, (args, stderr)
            assert "Traceback" not in stderr
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


class Page:
    """A page of headless Chromium, driven over the DevTools protocol."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = iter(range(1, 1_000_000))

    async def call(self, method: str, **params: object) -> dict:
        n = next(self.ids)
        await self.ws.send_json({"id": n, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=30)
            if msg.get("id") == n:
                return msg.get("result", {})

    async def value(self, expression: str) -> object:
        out = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                              awaitPromise=True)
        return out["result"].get("value")

    async def until(self, expression: str, timeout: float = 30.0) -> object:
        """The expression's value, once it is truthy."""
        import asyncio

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.value(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"{expression} stayed false for {timeout} s; the page's error: "
                             f"{await self.value(by_id('error') + '.textContent')!r}")

    async def generated(self) -> tuple[str, str]:
        """Once the page's generation has ended: (generated text, stats line); the page
        shows no error."""
        await self.until(f"{by_id('stats')}.dataset.done || {by_id('error')}.textContent")
        text, stats, error = await self.value(
            "['generated', 'stats', 'error'].map(i => document.getElementById(i)"
            "?.textContent)")
        assert not error, error
        return text, stats

    async def screenshot(self, path: Path) -> None:
        import base64

        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


def by_id(element: str) -> str:
    return f"document.getElementById({element!r})"


async def _in_browser(browser: str, profile: Path, url: str,
                      script: Callable[[Page], Awaitable[Any]]) -> Any:
    """Open ``url`` in headless Chromium and run ``script`` on the page."""
    import asyncio

    import aiohttp

    port = free_port()
    proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu",
                             f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                             "--window-size=1100,760", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as http:
            pages: list = []
            for _ in range(150):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                        pages = [p for p in await r.json() if p["type"] == "page"]
                except aiohttp.ClientError:
                    pass
                if pages:
                    break
                await asyncio.sleep(0.2)
            assert pages, "Chromium's DevTools endpoint did not come up"
            ws = await http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
            page = Page(ws)
            await page.call("Page.navigate", url=url)
            try:
                return await script(page)
            finally:
                await ws.close()
    finally:
        proc.terminate()
        proc.wait(10)


def chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("a headless browser is needed: apt-get install chromium")
    return browser


def in_browser(profile: Path, url: str, script: Callable[[Page], Awaitable[Any]]) -> Any:
    import asyncio

    return asyncio.run(_in_browser(chromium(), profile, url, script))


def test_the_page_streams_tokens_in_a_headless_browser(server, tmp_path) -> None:
    url = (f"http://127.0.0.1:{server.port}/?prompt=ROMEO:&temperature=0&max_tokens=24"
           "&autorun=1")
    text, stats = in_browser(tmp_path / "profile", url, Page.generated)
    expected = server.post({"prompt": "ROMEO:", "max_tokens": 24, "temperature": 0})[1]
    assert text == expected["choices"][0]["text"]
    assert stats.startswith("24 tokens; prefill") and "2 all-reduces per token" in stats


def test_the_page_offers_the_max_tokens_that_fit_the_prompt(tmp_path) -> None:
    """Issue 28: on a model of context 64 (the README's quickstart), the page's first
    click (its default prompt, 6 tokens, and max tokens 64) got `400: 6 prompt tokens +
    max_tokens 64 exceed the context of 64`. It now offers what fits the prompt, follows
    the prompt as it changes, and never sends a request the server refuses."""
    chromium()  # skipped before a server starts
    s = Server(write_checkpoint(tmp_path / "ckpt.pt", block_size=64))
    max_tokens = f"{by_id('max_tokens')}.value"

    async def script(page: Page) -> tuple[object, str, list[object], str]:
        await page.until(f"{by_id('fit')}.dataset.ready")
        offered = await page.value(max_tokens)
        await page.value(f"{by_id('go')}.click()")  # the defaults, as a first visit has them
        _, stats = await page.generated()
        offers = []
        for prompt in ("ROMEO: But soft, what light", "RO", "R" * 70):
            await page.value(f"(e => {{ e.value = {json.dumps(prompt)}; "
                             "e.dispatchEvent(new Event('input')); })" f"({by_id('prompt')})")
            # the offer follows once the page has the new prompt's count
            fit = "context is 64" if len(prompt) > 64 else f"prompt {len(prompt)} tokens"
            await page.until(f"{by_id('fit')}.textContent.includes({fit!r})")
            offers.append(await page.value(max_tokens))
        await page.value(f"{by_id('go')}.click()")  # a prompt too long: said, not sent
        error = await page.until(f"{by_id('error')}.textContent")
        return offered, stats, offers, str(error)

    try:
        offered, stats, offers, error = in_browser(tmp_path / "profile",
                                                   f"http://127.0.0.1:{s.port}/", script)
        metrics = s.get("/metrics")[1]
    finally:
        code, out = s.stop()
    assert offered == "59" and stats.startswith("59 tokens; prefill"), (offered, stats)
    assert offers == ["38", "63", "63"]  # the too-long prompt leaves the last offer
    assert "the prompt is 70 tokens; this model's context is 64" in error
    assert metrics["bad_requests"] == 0 and metrics["completed"] == 1, metrics
    assert code == 0, out


def test_a_hugging_face_folder_is_served_with_its_config(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from spd_ext.serve import inspect_source

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=32, vocab_size=61, n_positions=48,
        initializer_range=0.5)).eval()  # eval: GPT2Config's dropout is on by default
    hf.save_pretrained(tmp_path / "gpt2-tiny")
    source = inspect_source(None, str(tmp_path / "gpt2-tiny"), None, 2)
    c = source.config
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size, c.pattern,
            c.tp_size) == (2, 4, 32, 61, 48, "tp*2", 2)
    prompt = torch.tensor([[1, 2, 3]])
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                      min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(source.build().generate(prompt, 6, temperature=0), ref)
    reduced = inspect_source(None, str(tmp_path / "gpt2-tiny"), "spd*2", 2)
    assert reduced.config.pattern == "spd*2" and reduced.build().kinds == ["spd", "spd"]
    with pytest.raises(ValueError, match="exactly one of --checkpoint"):
        inspect_source(None, None, None, 2)
