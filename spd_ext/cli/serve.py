"""`spd-ext serve`: a reduced-sync GPT over HTTP on N local ranks. The flags derive from
spd_ext.serve.options; the server (and torch, aiohttp) load only when it runs."""

from __future__ import annotations

import argparse

from spd_ext.cli.flags import HelpAsWritten, add_options, config_from
from spd_ext.errors import UsageError
from spd_ext.serve.options import ServeOptions

_SOURCES = ("checkpoint", "hf")
_DESCRIPTION = (
    "Split a model over N local ranks (tensor parallel N) and serve it: POST "
    "/v1/completions\n(OpenAI's completion format, for OpenAI and vLLM clients; \"stream\": "
    "true for OpenAI's\nserver-sent events), GET /v1/models, POST /tokenize, GET /health, "
    "GET /metrics, and a\nweb page at /. The model and the flags are checked before any "
    "rank starts; SIGINT or\nSIGTERM stops the server after the queued requests (a second "
    "one: at once), a rank that\ndies stops every rank (503 meanwhile).")
_EPILOG = (
    "example:\n  spd-ext serve --hf ./gpt2 --pattern 'spd*12' --nproc 2\n"
    "  spd-ext serve --hf ./gpt2 --nproc 4 --pp 2     # 2 stages of 6 blocks, tp 2 each\n"
    "  curl -N localhost:5050/v1/completions -d '{\"prompt\": \"Hello\", "
    "\"max_tokens\": 32, \"stream\": true}'")


def add_parser(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, formatter_class=HelpAsWritten, help=help,
                       description=_DESCRIPTION, epilog=_EPILOG)
    defaults = ServeOptions()
    add_options(p.add_mutually_exclusive_group(required=True), defaults, only=_SOURCES)
    add_options(p, defaults, skip=_SOURCES)
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise UsageError("spd-ext serve needs aiohttp: pip install 'spd_ext[serve]'") from None
    from spd_ext.serve import inspect_source
    from spd_ext.serve.app import run_server

    options = config_from(args, ServeOptions())
    if options.nproc % options.pp:
        raise UsageError(f"--nproc {options.nproc} is not a multiple of --pp {options.pp}: "
                         "each pipeline stage runs on nproc / pp tensor-parallel ranks")
    source = inspect_source(options.checkpoint, options.hf, options.pattern,
                            options.nproc // options.pp, options.pp)
    print(f"spd-ext serve: {source.describe()}", flush=True)
    if source.note:
        print(f"spd-ext serve: note: {source.note}", flush=True)
    # the server loads the tokenizer before any rank starts: a missing file is one line
    return run_server(source, options)
