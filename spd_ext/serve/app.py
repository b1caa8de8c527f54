"""The HTTP front end of `spd-ext serve` (aiohttp): a JSON completion endpoint with
server-sent-event streaming, /health, /metrics and a web page at /.

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
import signal
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from spd_ext.comm.backend import SPD_EXT
from spd_ext.launch import RankError, spawn
from spd_ext.serve.model_source import ModelSource
from spd_ext.serve.ranks import keepalive_interval, serve_rank
from spd_ext.tp.generation import new_tokens_that_fit

FIELDS = {"prompt", "prompt_ids", "max_tokens", "temperature", "top_k", "seed", "stream"}
MAX_TEMPERATURE = 100.0
# The ranks' process-group timeout by default: a collective that waits this long means a
# rank stopped answering. An idle server's ranks never wait that long (the first rank's
# keepalives); the job itself has no deadline.
RANK_TIMEOUT_S = 300.0
# How often the front end looks at the rank processes itself, and how long a rank may be
# gone before it acts without the launcher's report (which comes within a second of a
# crash, and within seconds of a clean stop: spawn joins each rank for up to 5 s).
WATCH_S, WATCH_GRACE_S = 0.5, 10.0
# A second SIGINT/SIGTERM stops at once only this long after the first: `timeout` sends
# its signal twice, to the child and to the child's process group, microseconds apart.
SECOND_SIGNAL_S = 0.5


class RequestError(ValueError):
    """A request the server refuses with 400: the message says what to change."""


@dataclass
class Completion:
    """A validated request."""

    ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    seed: int | None
    stream: bool


def _int(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def parse_request(body: Any, tokenizer: Any, context: int, vocab: int) -> Completion:
    """The request's fields, checked against the model; RequestError names the problem."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object such as {\"prompt\": \"Hello\", "
                           "\"max_tokens\": 32}")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; the fields are {sorted(FIELDS)}")
    if ("prompt" in body) == ("prompt_ids" in body):
        raise RequestError("pass exactly one of prompt (text) or prompt_ids (token ids)")
    if "prompt" in body:
        prompt = body["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt must be a non-empty string")
        try:
            ids = tokenizer.encode(prompt)
        except (ValueError, KeyError) as exc:
            raise RequestError(f"the prompt cannot be tokenized by this model's tokenizer: "
                               f"{exc}") from None
    else:
        ids = body["prompt_ids"]
        if not isinstance(ids, list) or not ids or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise RequestError("prompt_ids must be a non-empty list of integers")
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise RequestError(f"unknown token id(s) {bad[:5]}: ids must be in [0, {vocab})")
    room = new_tokens_that_fit(len(ids), context)
    if room < 1:
        raise RequestError(f"the prompt is {len(ids)} tokens; this model's context is "
                           f"{context}, so the prompt must be at most {context}")
    # by default as many as fit, up to 64 (a small model's context may hold fewer)
    max_tokens = _int(body, "max_tokens", min(64, room), 1, context)
    assert max_tokens is not None
    if max_tokens > room:
        raise RequestError(f"{len(ids)} prompt tokens + max_tokens {max_tokens} exceed the "
                           f"context of {context}; ask for at most {room} tokens")
    temperature = body.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise RequestError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] "
                           f"(0 = greedy), got {temperature!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}")
    top_k = _int(body, "top_k", None, 1, 2**31)  # more than the vocabulary: all of it
    return Completion(ids, max_tokens, float(temperature),
                      None if top_k is None else min(top_k, vocab),
                      _int(body, "seed", None, 0, 2**62), stream)


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
                 rank_timeout_s: float = RANK_TIMEOUT_S) -> None:
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

    def send(self, message: tuple) -> None:
        self.outbox.put(message)


class CompletionServer:
    def __init__(self, source: ModelSource, backend: str = SPD_EXT, max_queue: int = 64,
                 fail_grace_s: float = 3.0, rank_timeout_s: float = RANK_TIMEOUT_S) -> None:
        self.rank_timeout_s = rank_timeout_s
        self.source, self.backend = source, backend
        self.nproc = source.config.tp_size  # one rank per shard
        self.tokenizer = source.load_tokenizer()
        self.vocab = min(source.config.vocab_size, self.tokenizer.vocab_size)
        self.context = source.config.block_size
        self.max_queue, self.fail_grace_s = max_queue, fail_grace_s
        self.state, self.failure, self.info = "loading", "", {}
        self.streams: dict[int, asyncio.Queue] = {}
        self.cancelled: set[int] = set()  # requests of self.streams cancelled already
        self.ids = itertools.count(1)
        self.counts = {"requests": 0, "completed": 0, "cancelled": 0, "refused": 0,
                       "failed": 0, "tokens": 0}
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

    def _on_message(self, message: tuple) -> None:
        if message[0] == "ready":
            self.info = message[1]
            assert self.job is not None
            self.job.ready()
            if self.state != "loading":  # stopped while loading: stay stopping
                return
            self.state = "ready"
            print(f"spd-ext serve: ready ({self.source.describe()}; rank pids "
                  f"{self.info['pids']})", flush=True)
            return
        stream = self.streams.get(message[1])
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
            stream.put_nowait(("failed", 0, self.failure))
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
                self.job.send(("stop",))
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
        return web.json_response({"error": why[self.state]}, status=503)

    async def health(self, request: web.Request) -> web.Response:
        body = {"status": "ok" if self.state == "ready" else self.state,
                "model": self.source.describe(), "pattern": self.source.config.pattern,
                "tp_size": self.nproc, "backend": self.backend, "context": self.context,
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
            "tp_size": self.nproc})

    async def page(self, request: web.Request) -> web.Response:
        html = resources.files("spd_ext.serve").joinpath("page.html").read_text()
        return web.Response(text=html, content_type="text/html")

    async def complete(self, request: web.Request) -> web.StreamResponse:
        busy = self.unavailable()
        if busy is not None:
            return busy
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.counts["refused"] += 1
            return web.json_response({"error": "the body is not valid JSON"}, status=400)
        except RecursionError:
            self.counts["refused"] += 1
            return web.json_response({"error": "the body nests arrays or objects too deeply "
                                      "to parse; a request is one flat JSON object"}, status=400)
        except ValueError as exc:  # Python's limit on the digits of an integer
            self.counts["refused"] += 1
            return web.json_response({"error": f"the body cannot be parsed: "
                                      f"{str(exc).split(':')[0]}; send numbers within the "
                                      "fields' ranges"}, status=400)
        try:
            req = parse_request(body, self.tokenizer, self.context, self.vocab)
        except RequestError as exc:
            self.counts["refused"] += 1
            return web.json_response({"error": str(exc)}, status=400)
        if len(self.streams) >= self.max_queue:
            return web.json_response({"error": f"{self.max_queue} requests are already "
                                      "queued; retry later"}, status=503)
        rid = next(self.ids)
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[rid] = queue
        self.counts["requests"] += 1
        assert self.job is not None
        self.job.send(("generate", rid, req.ids, req.max_tokens, req.temperature, req.top_k,
                       req.seed))
        try:
            if req.stream:
                return await self._stream(request, rid, req, queue)
            return await self._whole(request, rid, req, queue)
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
            if message[0] in ("done", "error", "fault", "failed"):
                return

    def _cancel(self, rid: int) -> None:
        if rid in self.cancelled:  # once: a closed stream's last write fails after _events
            return
        self.cancelled.add(rid)
        self.counts["cancelled"] += 1
        if self.job is not None:
            self.job.send(("cancel", rid))

    @staticmethod
    def _fault(message: tuple) -> str:
        return (f"this request failed on {message[2]} (the traceback is in the server's log; "
                "the server goes on serving other requests)")

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)  # the ranks sample below the tokenizer's vocabulary

    def _token_event(self, message: tuple, emitted: list[int], text_so_far: list[str]) -> dict:
        _, _, index, token, seconds, syncs, positions = message
        emitted.append(token)
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
        return {"index": index, "token": token, "text": piece,
                "latency_ms": round(seconds * 1e3, 3), "syncs": syncs, "positions": positions}

    @staticmethod
    def _summary(req: Completion, events: list[dict], reason: str) -> dict:
        decode = [e["latency_ms"] for e in events[1:]]
        return {"finish_reason": reason,
                "usage": {"prompt_tokens": len(req.ids), "completion_tokens": len(events)},
                "timing": {"prefill_ms": events[0]["latency_ms"] if events else None,
                           "decode_ms_p50": statistics.median(decode) if decode else None,
                           "syncs_per_token": events[-1]["syncs"] if events else None}}

    async def _whole(self, request: web.Request, rid: int, req: Completion,
                     queue: asyncio.Queue) -> web.Response:
        emitted: list[int] = []
        text = [""]
        events = []
        async for message in self._events(request, rid, queue):
            if message[0] == "step":
                events.append(self._token_event(message, emitted, text))
            elif message[0] == "error":
                self.counts["refused"] += 1
                return web.json_response({"error": message[2]}, status=400)
            elif message[0] == "fault":
                self.counts["failed"] += 1
                return web.json_response({"error": self._fault(message)}, status=500)
            elif message[0] == "failed":
                self.counts["failed"] += 1
                return web.json_response({"error": f"a rank failed: {message[2]}"}, status=503)
            elif message[0] == "done":
                self.counts["completed"] += 1
                return web.json_response({"id": rid, "text": self._decode(emitted),
                                          "token_ids": emitted,
                                          **self._summary(req, events, message[2])})
        return web.json_response({"error": "the client went away"}, status=499)

    async def _stream(self, request: web.Request, rid: int, req: Completion,
                      queue: asyncio.Queue) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        emitted: list[int] = []
        text = [""]
        events = []

        async def send(data: dict, event: str | None = None) -> None:
            head = f"event: {event}\n" if event else ""
            await response.write(f"{head}data: {json.dumps(data)}\n\n".encode())

        try:
            await response.write(b": queued\n\n")
            async for message in self._events(request, rid, queue):
                if message[0] == "step":
                    events.append(self._token_event(message, emitted, text))
                    await send(events[-1])
                elif message[0] == "error":
                    self.counts["refused"] += 1
                    await send({"error": message[2]}, "error")
                elif message[0] == "fault":
                    self.counts["failed"] += 1
                    await send({"error": self._fault(message), "status": 500}, "error")
                elif message[0] == "failed":
                    self.counts["failed"] += 1
                    await send({"error": f"a rank failed: {message[2]}", "status": 503},
                               "error")
                elif message[0] == "done":
                    self.counts["completed"] += 1
                    await send({"done": True, "id": rid, "text": self._decode(emitted),
                                **self._summary(req, events, message[2])})
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self._cancel(rid)  # the client went away: stop its generation, keep serving
            raise
        return response

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/", self.page)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
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
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another "
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


def run_server(source: ModelSource, host: str = "127.0.0.1", port: int = 5050,
               backend: str = SPD_EXT, max_queue: int = 64, fail_grace_s: float = 3.0,
               rank_timeout_s: float = RANK_TIMEOUT_S) -> int:
    """Serve until SIGINT/SIGTERM (exit 0), or a rank fails, a rank is found gone when
    stopping, or a second signal stops at once (exit 1, after ``fail_grace_s``)."""
    server = CompletionServer(source, backend, max_queue, fail_grace_s, rank_timeout_s)
    return asyncio.run(_serve(server, host, port))
