"""The HTTP front end of `spd-ext serve` (aiohttp): OpenAI's completion endpoint
(/v1/completions, streamed as OpenAI's server-sent events; /v1/models), /tokenize,
/health, /metrics and a web page at /.

It runs in the launching process, next to the ranks rather than inside rank 0, so that a
rank dying (even rank 0) leaves it able to answer 503 with the launcher's message naming
the rank; the launcher has by then stopped every other rank.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import secrets
import signal
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from spd_ext.errors import UsageError
from spd_ext.launch import RankError, spawn
from spd_ext.serve.messages import (
    LAST,
    Cancel,
    Done,
    Fault,
    Generate,
    RanksFailed,
    Ready,
    Refused,
    Stop,
    Token,
)
from spd_ext.serve.model_source import ModelSource
from spd_ext.serve.options import ServeOptions
from spd_ext.serve.ranks import keepalive_interval, serve_rank
from spd_ext.tp.generation import new_tokens_that_fit

# The fields of OpenAI's completion request this server takes, and top_k (vLLM's name for
# it). One model is served: `model` may name anything; `user` (an end-user id) is ignored.
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_k", "seed", "stream",
          "stream_options", "user"}
# OpenAI's fields asking for what this server does not do: accepted at the value that asks
# for nothing (or null, OpenAI's "default"), so a client that sends its defaults works;
# any other value is refused by name rather than silently ignored.
NEUTRAL: dict[str, tuple] = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (),
                             "suffix": ("",), "stop": ("", []), "top_p": (1,),
                             "presence_penalty": (0,), "frequency_penalty": (0,),
                             "logit_bias": ({},)}
MAX_TEMPERATURE = 100.0
DEFAULT_MAX_TOKENS = 64
# How often the front end looks at the rank processes itself, and how long a rank may be
# gone before it acts without the launcher's report (which comes within a second of a
# crash, and within seconds of a clean stop: spawn joins each rank for up to 5 s).
WATCH_S, WATCH_GRACE_S = 0.5, 10.0
# A second SIGINT/SIGTERM stops at once only this long after the first: `timeout` sends
# its signal twice, to the child and to the child's process group, microseconds apart.
SECOND_SIGNAL_S = 0.5


class RequestError(UsageError):
    """A request the server refuses with 400: the message says what to change."""


# OpenAI's error types by HTTP status (499: the client went away; nobody reads it)
ERROR_TYPES = {400: "invalid_request_error", 499: "client_closed_request",
               500: "server_error", 503: "service_unavailable"}


def error_body(status: int, message: str) -> dict:
    """An error in OpenAI's form: its clients raise it with the message."""
    return {"message": message, "type": ERROR_TYPES[status], "param": None, "code": status}


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": error_body(status, message)}, status=status)


@dataclass
class Completion:
    """A validated request."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    seed: int | None
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def _given(body: dict, name: str, default: Any) -> Any:
    """The field's value; null counts as absent (OpenAI clients send nulls for defaults)."""
    value = body.get(name)
    return default if value is None else value


def _int(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = _given(body, name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object such as {\"prompt\": \"Hello\", "
                           "\"max_tokens\": 32}")
    return body


def prompt_ids(body: dict, tokenizer: Any, vocab: int) -> list[int]:
    """The request's prompt as token ids: OpenAI's prompt is text or a list of token ids,
    either of them alone or as a batch of one."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1:
            raise RequestError(f"prompt is a batch of {len(prompt)} prompts; this server "
                               "answers one prompt per request")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt must be a non-empty string")
        try:
            return list(tokenizer.encode(prompt))
        except (ValueError, KeyError) as exc:
            raise RequestError(f"the prompt cannot be tokenized by this model's tokenizer: "
                               f"{exc}") from None
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        raise RequestError("prompt must be a non-empty string, or a non-empty list of token "
                           "ids (integers)")
    bad = [i for i in prompt if not 0 <= i < vocab]
    if bad:
        raise RequestError(f"unknown token id(s) {bad[:5]}: ids must be in [0, {vocab})")
    return prompt


def room_for(ids: list[int], context: int) -> int:
    """The most tokens a completion of ``ids`` may ask for; RequestError if none fit."""
    room = new_tokens_that_fit(len(ids), context)
    if room < 1:
        raise RequestError(f"the prompt is {len(ids)} tokens; this model's context is "
                           f"{context}, so the prompt must be at most {context}")
    return room


def parse_request(body: Any, tokenizer: Any, context: int, vocab: int) -> Completion:
    """The request's fields, checked against the model; RequestError names the problem."""
    body = _object(body)
    unknown = sorted(set(body) - FIELDS - set(NEUTRAL))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; the fields are {sorted(FIELDS)}")
    unsupported = [f"{k}={body[k]!r}" for k in NEUTRAL
                   if body.get(k) is not None and body[k] not in NEUTRAL[k]]
    if unsupported:
        raise RequestError(f"unsupported: {', '.join(unsupported)}; this server returns one "
                           "completion (n and best_of 1) of max_tokens tokens sampled with "
                           "temperature, top_k and seed: no stop, logprobs, echo, suffix, "
                           "top_p, penalties or logit_bias")
    if not isinstance(body.get("model", ""), (str, type(None))):
        raise RequestError(f"model must be a string, got {body['model']!r}")
    ids = prompt_ids(body, tokenizer, vocab)
    room = room_for(ids, context)
    # by default as many as fit, up to 64 (a small model's context may hold fewer)
    max_tokens = _int(body, "max_tokens", min(DEFAULT_MAX_TOKENS, room), 1, context)
    assert max_tokens is not None
    if max_tokens > room:
        raise RequestError(f"{len(ids)} prompt tokens + max_tokens {max_tokens} exceed the "
                           f"context of {context}; ask for at most {room} tokens")
    temperature = _given(body, "temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise RequestError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] "
                           f"(0 = greedy), got {temperature!r}")
    stream = _given(body, "stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}")
    options = _given(body, "stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage"} \
            or not isinstance(options.get("include_usage", False), bool) \
            or (options and not stream):
        raise RequestError(f"stream_options must be {{\"include_usage\": true or false}}, "
                           f"with stream true; got {options!r}")
    top_k = _int(body, "top_k", None, 1, 2**31)  # more than the vocabulary: all of it
    return Completion(ids, max_tokens, float(temperature),
                      None if top_k is None else min(top_k, vocab),
                      _int(body, "seed", None, 0, 2**62), stream,
                      bool(options.get("include_usage", False)))


def rank_exited(pid: int) -> bool:
    """Whether rank process ``pid``, a child of this process, has exited: without collecting
    it (the launcher does), so a pid that is no child of ours any more is gone too."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class RankJob:
    """The ranks (spd_ext.launch.spawn, on a thread) and the pipe to the first rank, read and
    written by threads of their own: the event loop never waits on a rank."""

    def __init__(self, source: ModelSource, nproc: int, backend: str, vocab_size: int,
                 loop: asyncio.AbstractEventLoop, on_message: Any, on_exit: Any,
                 rank_timeout_s: float) -> None:
        self.loop, self.on_message, self.on_exit = loop, on_message, on_exit
        self.rank_timeout_s = rank_timeout_s
        self.conn, self.child = mp.get_context("spawn").Pipe()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="spd_ext-serve-ranks",
                                       args=(source, nproc, backend, vocab_size), daemon=True)
        self.reader = threading.Thread(target=self._read, name="spd_ext-serve-reader",
                                       daemon=True)
        self.writer = threading.Thread(target=self._write, name="spd_ext-serve-writer",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.reader.start()
        self.writer.start()

    def ready(self) -> None:
        """Every rank has its copy of the pipe: drop this process's copy of the first
        rank's end, so that a first rank that is gone ends the pipe (no write waits for a
        reader that will never come)."""
        self.child.close()

    def _tell(self, callback: Any, *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass  # the loop is closed: the server has exited already

    def _run(self, source: ModelSource, nproc: int, backend: str, vocab_size: int) -> None:
        failure = None
        try:
            # spd_ext's collectives (the generation's all-reduces) wait as long as gloo's
            spawn(serve_rank, nproc, source, backend, vocab_size, self.child,
                  keepalive_interval(self.rank_timeout_s), timeout=math.inf,
                  pg_timeout=self.rank_timeout_s,
                  env={"SPD_EXT_COMM_TIMEOUT": repr(self.rank_timeout_s)})
        except RankError as exc:
            failure = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported to the clients, not lost
            failure = f"the ranks could not start: {exc}"
        self._tell(self.on_exit, failure)

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return
            self._tell(self.on_message, message)

    def _write(self) -> None:
        while True:
            try:
                self.conn.send(self.outbox.get())
            except (BrokenPipeError, OSError):
                return  # the ranks are gone; on_exit (or the server's watch) says why

    def send(self, message: Generate | Cancel | Stop) -> None:
        self.outbox.put(message)


class CompletionServer:
    def __init__(self, source: ModelSource, options: ServeOptions | None = None) -> None:
        options = options or ServeOptions()
        self.rank_timeout_s = options.rank_timeout_s
        self.source, self.backend = source, options.backend
        self.nproc = source.ranks  # one rank per shard of each stage
        self.tokenizer = source.load_tokenizer()
        self.vocab = min(source.config.vocab_size, self.tokenizer.vocab_size)
        self.context = source.config.block_size
        self.model_name = source.path  # what OpenAI's "model" fields say
        self.max_queue, self.fail_grace_s = options.max_queue, options.fail_grace_s
        self.state, self.failure, self.info = "loading", "", {}
        self.streams: dict[int, asyncio.Queue] = {}
        self.cancelled: set[int] = set()  # requests of self.streams cancelled already
        self.ids = itertools.count(1)
        # bad_requests: 400s; queue_full: 503s for a full queue (both never queued)
        self.counts = {"requests": 0, "completed": 0, "cancelled": 0, "bad_requests": 0,
                       "queue_full": 0, "failed": 0, "tokens": 0}
        self.latencies: deque[float] = deque(maxlen=2000)  # seconds per decoded token
        self.prefills: deque[float] = deque(maxlen=200)
        self.syncs_per_token = None
        self.started = time.time()
        self.finished: asyncio.Event | None = None
        self.job: RankJob | None = None
        self.job_done = False  # the launcher has reported
        self.gone_since: float | None = None  # when the watch first saw a rank gone
        self.stopping_since = 0.0  # when the first SIGINT/SIGTERM came

    # -- the ranks -----------------------------------------------------------------
    def start_ranks(self) -> None:
        loop = asyncio.get_running_loop()
        self.finished = asyncio.Event()
        self.job = RankJob(self.source, self.nproc, self.backend, self.vocab, loop,
                           self._on_message, self._on_exit, self.rank_timeout_s)
        self.job.start()
        self._watch()

    def _on_message(self, message: Ready | Token | Done | Refused | Fault) -> None:
        if isinstance(message, Ready):
            self.info = {"pids": message.pids}
            assert self.job is not None
            self.job.ready()
            if self.state != "loading":  # stopped while loading: stay stopping
                return
            self.state = "ready"
            print(f"spd-ext serve: ready ({self.source.describe()}; rank pids "
                  f"{self.info['pids']})", flush=True)
            return
        stream = self.streams.get(message.request)
        if stream is not None:
            stream.put_nowait(message)

    def _on_exit(self, failure: str | None) -> None:
        """The launcher's word: every rank returned (None), or its message naming the
        rank that failed, every other rank stopped already."""
        self.job_done = True
        if failure is not None:
            self._fail(failure)
        elif self.state != "failed":
            assert self.finished is not None
            self.finished.set()

    def _fail(self, failure: str) -> None:
        """Answer 503 for the grace period, then exit 1; any rank still running is ended."""
        if self.state == "failed":
            return
        # The first line names the rank and how it ended; the tracebacks go to the log.
        self.state, self.failure = "failed", failure.splitlines()[0]
        for stream in self.streams.values():
            stream.put_nowait(RanksFailed(0, self.failure))
        self._kill_ranks()
        print(f"spd-ext serve: {failure.strip()}\nspd-ext serve: every rank was stopped; "
              f"answering 503 for {self.fail_grace_s:g} s, then exiting", flush=True)
        assert self.finished is not None
        asyncio.get_running_loop().call_later(self.fail_grace_s, self.finished.set)

    def _pids(self) -> list[int]:
        return list(self.info.get("pids", []))

    @staticmethod
    def _kill_ranks() -> None:
        """SIGKILL every rank still running: after a failure the launcher has stopped them
        already; this is for a forced stop and for a launcher that has not reported. (Left
        running, a rank would also hold the exit: multiprocessing joins its children.)"""
        for child in mp.active_children():
            if child.name.startswith("spd_ext-rank"):  # spawn's names; nothing else of ours
                child.kill()

    def _watch(self) -> None:
        """Every WATCH_S: a rank that has exited while the launcher, past WATCH_GRACE_S,
        still says nothing fails the server by itself; it never waits for ranks that are
        gone, whatever state it is in."""
        if self.state == "failed" or self.job_done:
            return
        gone = [r for r, pid in enumerate(self._pids()) if rank_exited(pid)]
        now = time.monotonic()
        if not gone:
            self.gone_since = None
        elif self.gone_since is None:
            self.gone_since = now
        elif now - self.gone_since >= WATCH_GRACE_S:
            self._fail(f"rank {gone[0]} (pid {self._pids()[gone[0]]}) exited and the "
                       "launcher did not report it; stopping every rank")
            return
        asyncio.get_running_loop().call_later(WATCH_S, self._watch)

    @property
    def exit_code(self) -> int:
        return 1 if self.state == "failed" else 0

    def stop(self) -> None:
        """SIGINT/SIGTERM: finish the queued requests, stop the ranks, then exit. With a
        rank already gone, fail at once (exit 1 after the grace period); a second signal
        while stopping stops at once too, whatever the ranks are doing."""
        if self.state in ("ready", "loading"):
            self.state, self.stopping_since = "stopping", time.monotonic()
            gone = [r for r, pid in enumerate(self._pids()) if rank_exited(pid)]
            if gone:
                self._fail(f"rank {gone[0]} (pid {self._pids()[gone[0]]}) has exited; "
                           "stopping every rank")
            elif self.job is not None:
                self.job.send(Stop())
            else:
                assert self.finished is not None
                self.finished.set()
        elif self.state == "stopping" and \
                time.monotonic() - self.stopping_since >= SECOND_SIGNAL_S:
            self._fail(f"stopped at once by a second signal, with {len(self.streams)} "
                       "request(s) unfinished; the ranks were ended")

    # -- HTTP ------------------------------------------------------------------------
    def unavailable(self) -> web.Response | None:
        if self.state == "ready":
            return None
        why = {"loading": "the model is still loading; retry when /health says ok",
               "stopping": "the server is shutting down",
               "failed": f"a rank failed and the server is shutting down: {self.failure}"}
        return error_response(503, why[self.state])

    async def health(self, request: web.Request) -> web.Response:
        body = {"status": "ok" if self.state == "ready" else self.state,
                "model": self.source.describe(), "pattern": self.source.config.pattern,
                "tp_size": self.source.config.tp_size, "pp": self.source.stages,
                "backend": self.backend, "context": self.context,
                "queue": len(self.streams),
                "ranks": [{"rank": r, "pid": p, "alive": not rank_exited(p)}
                          for r, p in enumerate(self._pids())]}
        if self.failure:
            body["error"] = self.failure
        return web.json_response(body, status=200 if self.state == "ready" else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, round(q * (len(lat) - 1)))] * 1e3, 3) \
                if lat else None

        return web.json_response({
            **self.counts, "active": len(self.streams),
            "uptime_s": round(time.time() - self.started, 1),
            "decode_ms_p50": pct(0.5), "decode_ms_p99": pct(0.99),
            "prefill_ms_p50": round(statistics.median(self.prefills) * 1e3, 3)
            if self.prefills else None,
            "tokens_per_s": round(len(lat) / sum(lat), 2) if lat else None,
            "syncs_per_token": self.syncs_per_token, "pattern": self.source.config.pattern,
            "tp_size": self.source.config.tp_size, "pp": self.source.stages})

    async def models(self, request: web.Request) -> web.Response:
        """OpenAI's model list (clients ask it for the name to send): the one served."""
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": int(self.started),
             "owned_by": "spd_ext", "max_model_len": self.context}]})

    async def page(self, request: web.Request) -> web.Response:
        html = resources.files("spd_ext.serve").joinpath("page.html").read_text()
        return web.Response(text=html, content_type="text/html")

    async def _body(self, request: web.Request) -> Any:
        """The request's JSON; RequestError says what is wrong with it."""
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError("the body is not valid JSON") from None
        except RecursionError:
            raise RequestError("the body nests arrays or objects too deeply to parse; a "
                               "request is one flat JSON object") from None
        except ValueError as exc:  # Python's limit on the digits of an integer
            raise RequestError(f"the body cannot be parsed: {str(exc).split(':')[0]}; send "
                               "numbers within the fields' ranges") from None

    async def tokenize(self, request: web.Request) -> web.Response:
        """A prompt's token count and the most max_tokens a completion of it may ask for
        (the page offers what fits, as the prompt changes). The tokenizer is this
        process's: it answers while the ranks load too."""
        try:
            body = _object(await self._body(request))
            unknown = sorted(set(body) - {"prompt", "model"})
            if unknown:
                raise RequestError(f"unknown field(s) {unknown}; the fields are "
                                   "['model', 'prompt']")
            ids = prompt_ids(body, self.tokenizer, self.vocab)
            room = room_for(ids, self.context)
        except RequestError as exc:
            return error_response(400, str(exc))
        return web.json_response({"count": len(ids), "max_model_len": self.context,
                                  "max_tokens": room, "tokens": ids})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        busy = self.unavailable()
        if busy is not None:
            return busy
        try:
            req = parse_request(await self._body(request), self.tokenizer, self.context,
                                self.vocab)
        except RequestError as exc:
            self.counts["bad_requests"] += 1
            return error_response(400, str(exc))
        if len(self.streams) >= self.max_queue:
            self.counts["queue_full"] += 1
            return error_response(503, f"{self.max_queue} requests are already queued; "
                                  "retry later")
        rid = next(self.ids)
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[rid] = queue
        self.counts["requests"] += 1
        assert self.job is not None
        self.job.send(Generate(rid, req.ids, req.max_tokens, req.temperature, req.top_k,
                               req.seed))
        # OpenAI's fields of every answer and chunk of this completion
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                "created": int(time.time()), "model": self.model_name}
        try:
            if req.stream:
                return await self._stream(request, rid, req, queue, head)
            return await self._whole(request, rid, req, queue, head)
        finally:
            del self.streams[rid]
            self.cancelled.discard(rid)

    async def _events(self, request: web.Request, rid: int, queue: asyncio.Queue) -> Any:
        """The request's messages from rank 0; a client gone while it waits cancels it."""
        while True:
            try:
                message = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    self._cancel(rid)
                    return
                continue
            yield message
            if isinstance(message, LAST):
                return

    def _cancel(self, rid: int) -> None:
        if rid in self.cancelled:  # once: a closed stream's last write fails after _events
            return
        self.cancelled.add(rid)
        self.counts["cancelled"] += 1
        # a client that hangs up is a normal event: one line, no traceback
        print(f"spd-ext serve: request {rid}: the client went away; its generation stops",
              flush=True)
        if self.job is not None:
            self.job.send(Cancel(rid))

    def _failure(self, message: Refused | Fault | RanksFailed) -> tuple[int, str]:
        """The HTTP status and message of a request that ended without its tokens."""
        if isinstance(message, Refused):
            self.counts["bad_requests"] += 1
            return 400, message.message
        self.counts["failed"] += 1
        if isinstance(message, Fault):
            return 500, (f"this request failed on {message.message} (the traceback is in "
                         "the server's log; the server goes on serving other requests)")
        return 503, f"a rank failed: {message.message}"

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)  # the ranks sample below the tokenizer's vocabulary

    def _token_event(self, message: Token, emitted: list[int], text_so_far: list[str]) -> dict:
        index, seconds, syncs = message.index, message.seconds, message.syncs
        emitted.append(message.token)
        text = self._decode(emitted)
        # A token may end inside a multi-byte character: hold its text until it is whole.
        piece = "" if text.endswith("\ufffd") else text[len(text_so_far[0]):]
        if piece:
            text_so_far[0] = text
        if index == 0:
            self.prefills.append(seconds)
        else:
            self.latencies.append(seconds)
        self.syncs_per_token = syncs
        self.counts["tokens"] += 1
        return {"index": index, "token": message.token, "text": piece,
                "latency_ms": round(seconds * 1e3, 3), "syncs": syncs,
                "positions": message.positions}

    @staticmethod
    def _usage(req: Completion, emitted: list[int]) -> dict:
        return {"prompt_tokens": len(req.ids), "completion_tokens": len(emitted),
                "total_tokens": len(req.ids) + len(emitted)}

    @staticmethod
    def _extras(events: list[dict], emitted: list[int]) -> dict:
        """spd_ext's own fields of a finished completion (OpenAI's format has none)."""
        decode = [e["latency_ms"] for e in events[1:]]
        return {"token_ids": emitted,
                "timing": {"prefill_ms": events[0]["latency_ms"] if events else None,
                           "decode_ms_p50": statistics.median(decode) if decode else None},
                "syncs_per_token": events[-1]["syncs"] if events else None}

    async def _whole(self, request: web.Request, rid: int, req: Completion,
                     queue: asyncio.Queue, head: dict) -> web.Response:
        emitted: list[int] = []
        text = [""]
        events = []
        async for message in self._events(request, rid, queue):
            if isinstance(message, Token):
                events.append(self._token_event(message, emitted, text))
            elif isinstance(message, Done):
                self.counts["completed"] += 1
                return web.json_response({
                    **head, "choices": [{"text": self._decode(emitted), "index": 0,
                                         "logprobs": None, "finish_reason": message.reason}],
                    "usage": self._usage(req, emitted),
                    "spd_ext": self._extras(events, emitted)})
            else:
                return error_response(*self._failure(message))
        return error_response(499, "the client went away")  # nobody reads it

    async def _stream(self, request: web.Request, rid: int, req: Completion,
                      queue: asyncio.Queue, head: dict) -> web.StreamResponse:
        """OpenAI's stream: a `data:` chunk per token (spd_ext's per-token fields in its
        "spd_ext"), a last one with the finish_reason (and the rest of the text, if the
        last token ended inside a character), the usage if asked for, then [DONE]."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        emitted: list[int] = []
        text = [""]
        events = []
        # with include_usage, OpenAI's chunks say "usage": null until the last one
        usage: dict = {"usage": None} if req.include_usage else {}

        async def send(data: dict | str) -> None:
            line = data if isinstance(data, str) else json.dumps(data)
            await response.write(f"data: {line}\n\n".encode())

        def chunk(piece: str, reason: str | None, extras: dict) -> dict:
            return {**head, "choices": [{"text": piece, "index": 0, "logprobs": None,
                                         "finish_reason": reason}], **usage,
                    "spd_ext": extras}

        try:
            await response.write(b": queued\n\n")
            async for message in self._events(request, rid, queue):
                if isinstance(message, Token):
                    events.append(self._token_event(message, emitted, text))
                    event = events[-1]
                    await send(chunk(event["text"], None,
                                     {k: v for k, v in event.items() if k != "text"}))
                elif isinstance(message, Done):
                    self.counts["completed"] += 1
                    rest = self._decode(emitted)[len(text[0]):]
                    await send(chunk(rest, message.reason, self._extras(events, emitted)))
                    if req.include_usage:
                        await send({**head, "choices": [], "usage": self._usage(req, emitted)})
                else:
                    await send({"error": error_body(*self._failure(message))})
            await send("[DONE]")
            await response.write_eof()
        except ConnectionResetError:
            # aiohttp's ClientConnectionResetError ("Cannot write to closing transport"):
            # the client hung up. Stop its generation and return: aiohttp's own last write
            # to the closed connection fails quietly, where raising logged a traceback.
            self._cancel(rid)
        except asyncio.CancelledError:
            self._cancel(rid)  # the server is stopping with this request in flight
            raise
        return response

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/", self.page)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/v1/completions", self.complete)
        return app


async def _serve(server: CompletionServer, host: str, port: int) -> int:
    runner = web.AppRunner(server.app(), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()  # before the ranks: a port in use fails before any rank loads
    except OSError as exc:
        await runner.cleanup()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another "
                         "--port") from None
    server.start_ranks()
    print(f"spd-ext serve: listening on http://{host}:{port} (loading the model on "
          f"{server.nproc} ranks)", flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop)
    assert server.finished is not None
    await server.finished.wait()
    await runner.cleanup()
    assert server.job is not None
    # The launcher has returned by now, or, after a forced stop, returns as soon as it sees
    # the ranks it was told about killed: a bounded wait, never one on ranks that are gone.
    await asyncio.to_thread(server.job.thread.join, 5.0)
    if server.exit_code == 0:
        print(f"spd-ext serve: stopped ({server.counts['completed']} requests completed, "
              f"{server.counts['tokens']} tokens)", flush=True)
    return server.exit_code


def run_server(source: ModelSource, options: ServeOptions) -> int:
    """Serve until SIGINT/SIGTERM (exit 0), or a rank fails, a rank is found gone when
    stopping, or a second signal stops at once (exit 1, after ``options.fail_grace_s``)."""
    server = CompletionServer(source, options)
    return asyncio.run(_serve(server, options.host, options.port))
