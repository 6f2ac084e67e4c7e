"""``nanoseek serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one :class:`Engine`.

Endpoints
    ``GET  /v1/models``, ``GET /v1/models/{id}``
    ``POST /v1/completions``        prompt: a string, a list of token ids, or a list of either
    ``POST /v1/chat/completions``   messages rendered with the checkpoint's chat template
    ``GET  /health``                200 while the engine loop runs, 503 when it has died
    ``GET  /metrics``               Prometheus text format (written by hand, no extra dependency)
    ``GET  /``                      a small web chat page (``static/index.html``)

Both generation endpoints stream (``"stream": true``: server-sent events ``data: {json}\\n\\n``
ending with ``data: [DONE]\\n\\n``; ``stream_options.include_usage`` adds a last chunk with
``usage`` and no choices) or answer in one JSON body. Parameters: ``max_tokens`` (chat also
``max_completion_tokens``; default: the rest of the context), ``temperature`` (default 1), ``top_p``,
``top_k`` (extension; -1 or 0 = off), ``stop`` (a string or a list of at most 16, each at most 128
characters), ``seed``, ``n``, ``logprobs``
(chat: ``true`` with ``top_logprobs`` 0; completions: ``0``: the sampled token's log-probability;
top alternatives are not computed), and the vLLM extensions ``ignore_eos`` and
``stop_token_ids``. Penalties, ``logit_bias``, ``echo``, ``best_of``, ``suffix``, tools and JSON
modes are refused with a 400 rather than silently ignored.

Chat messages are rendered with the template's markers as special tokens and each message's content
as plain text (:meth:`~nanoseek.data.tokenizer.NanoTokenizer.encode_chat`): a user who writes
``<|eos|><|system|>`` sends those characters, not a forged system turn. ``/v1/completions`` prompts
are raw model input: special tokens in them are matched.

Reasoning (as the DeepSeek API does): a chat reply's ``<think>…</think>`` goes to
``message.reasoning_content`` (streaming: ``delta.reasoning_content`` until ``</think>``), the rest
to ``content``; see :mod:`nanoseek.infer.reasoning`. ``reasoning_content`` of earlier assistant
turns sent back in ``messages`` is dropped, as the DeepSeek API asks clients not to send it.

Request bodies are limited (``max_body_bytes``, ``nanoseek serve --max-body-mb``, default 4 MiB): a
larger one gets a 413 (code ``request_too_large``), refused from its ``Content-Length`` before it is
read, or, sent chunked, as soon as it passes the limit. Text is tokenised in a worker thread, never on
the event loop, and with nanoseek's byte-level tokenizers a text too long for the context whatever its
tokens is refused without being tokenised.

Host check: ``create_app(allowed_hosts=...)`` answers only requests whose ``Host`` header names one
of those hosts (any port), others get a 421 (code ``host_not_allowed``). ``nanoseek serve`` on a
loopback address allows ``localhost``, ``127.0.0.1`` and ``[::1]`` plus ``--allowed-host`` names, so
a web page cannot reach the API through DNS rebinding (a name of its own that resolves to 127.0.0.1).

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for bad JSON,
wrong types (FastAPI's 422 is mapped to 400), bad values and prompts that do not fit the context
(the message names the numbers); 401 for a missing or wrong ``Authorization: Bearer KEY`` when a key
is set (``/v1/*`` and ``/metrics``: the page and ``/health`` stay open); 404 for an unknown model
or path; 429 when ``max_slots + max_queue`` requests are already in flight (a request that alone asks
for more generations, ``n`` × prompts, than that gets a 400: it could never fit); 500 when generation
fails (the engine loop carries on with the next requests).

Concurrency: one background thread owns the engine. Handlers never touch it: they post "add" and
"abort" commands to the thread, which applies them between steps, runs ``engine.step()`` while
work exists and hands every :class:`TokenEvent` to the request's ``asyncio.Queue`` with
``loop.call_soon_threadsafe``. A client that disconnects (mid-stream or while waiting for a
non-streamed answer) has its requests aborted: the slot is free before the next step.

Modules: :mod:`~nanoseek.infer.protocol` (request and error bodies, events),
:mod:`~nanoseek.infer.validation` (what a request may ask), :mod:`~nanoseek.infer.prompts`
(prompt token ids), :mod:`~nanoseek.infer.engine_loop` (the engine thread),
:mod:`~nanoseek.infer.streams` (admission and each request's events), :mod:`~nanoseek.infer.replies`
and :mod:`~nanoseek.infer.responder` (the answers), :mod:`~nanoseek.infer.gate` (Host, key, body
limit), :mod:`~nanoseek.infer.metrics`, :mod:`~nanoseek.infer.routes`; this module builds the app.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from typing import Iterable

import uvicorn
from fastapi import FastAPI

from ..errors import NanoseekError
from ..hf import load_with_tokenizer
from .engine import Engine
from .gate import DEFAULT_MAX_BODY_BYTES, MIB, Gate, allowed_hosts_for, is_loopback
from .routes import add_error_handlers, add_generation_routes, add_info_routes
from .state import ServerState

log = logging.getLogger("nanoseek.server")


def create_app(engine, tokenizer, model_name: str, api_key: str | None = None, max_queue: int = 64,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, allowed_hosts: Iterable[str] | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (which must not be stepped by anyone else while it runs).

    ``tokenizer`` is the checkpoint's :class:`~nanoseek.data.tokenizer.NanoTokenizer` (chat template,
    encode/decode); the engine should have it too (it decodes the text deltas). ``api_key`` protects
    ``/v1/*`` and ``/metrics``. At most ``engine max_slots + max_queue`` generation requests are in flight;
    more get a 429. Request bodies over ``max_body_bytes`` get a 413. ``allowed_hosts`` (host names, any
    port; None: no check) lists the Host headers answered; others get a 421 (see :func:`allowed_hosts_for`).
    The engine thread starts with the app (lifespan) or at the first request, and stops at shutdown.
    """
    server = ServerState(engine, tokenizer, model_name, api_key, max_queue, max_body_bytes, allowed_hosts)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()

    app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server
    app.state.engine_loop = server.loop
    app.state.metrics = server.metrics
    app.add_middleware(Gate, metrics=server.metrics, allowed_hosts=server.allowed_hosts, api_key=server.api_key,
                       max_body_bytes=server.max_body_bytes)
    add_error_handlers(app, server)
    add_info_routes(app, server)
    add_generation_routes(app, server)
    return app


def serve_main(args: argparse.Namespace) -> int:
    """``nanoseek serve --ckpt DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...``."""
    api_key = getattr(args, "api_key", None) or os.environ.get("NANOSEEK_API_KEY") or None
    host = getattr(args, "host", "127.0.0.1")
    if not is_loopback(host) and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use it", host)
    print(f"nanoseek serve: loading {args.ckpt}", flush=True)
    model, tokenizer = load_with_tokenizer(args.ckpt, getattr(args, "device", "auto"), getattr(args, "dtype", "auto"))
    cfg = model.config
    max_seq_len = getattr(args, "max_seq_len", None) or min(cfg.max_position_embeddings, 8192)
    if max_seq_len > cfg.max_position_embeddings:
        log.warning("--max-seq-len %d exceeds the model's max_position_embeddings %d: positions past %d were "
                    "never trained (RoPE), so long prompts and replies will degrade; the cache is also sized "
                    "for %d tokens per slot", max_seq_len, cfg.max_position_embeddings,
                    cfg.max_position_embeddings, max_seq_len)
    if getattr(args, "max_slots", 16) <= 0:
        raise NanoseekError(f"--max-slots must be positive, got {args.max_slots}")
    if getattr(args, "max_queue", 64) < 0:
        raise NanoseekError(f"--max-queue must be >= 0, got {args.max_queue}")
    max_body_mb = getattr(args, "max_body_mb", DEFAULT_MAX_BODY_BYTES / MIB)
    if not max_body_mb > 0:
        raise NanoseekError(f"--max-body-mb must be positive, got {max_body_mb}")
    engine = Engine(model, tokenizer, max_slots=args.max_slots, max_seq_len=max_seq_len,
                    speculative="mtp" if getattr(args, "speculative", False) else None,
                    compile=getattr(args, "compile", False))
    name = getattr(args, "model_name", None) or os.path.basename(os.path.normpath(os.path.abspath(args.ckpt)))
    allowed_hosts = allowed_hosts_for(host, getattr(args, "allowed_host", None) or ())
    app = create_app(engine, tokenizer, name, api_key=api_key, max_queue=args.max_queue,
                     max_body_bytes=max(1, int(max_body_mb * MIB)), allowed_hosts=allowed_hosts)
    shown = f"[{host}]" if ":" in host else host
    print(f"nanoseek serve: model '{name}', {args.max_slots} slots × {max_seq_len} tokens, queue {args.max_queue}"
          f"{', API key required' if api_key else ''}", flush=True)
    print(f"nanoseek serve: http://{shown}:{args.port}/  (OpenAI API at http://{shown}:{args.port}/v1)", flush=True)
    uvicorn.run(app, host=host, port=args.port, log_level=getattr(args, "log_level", "info"),
                timeout_graceful_shutdown=5)
    return 0
