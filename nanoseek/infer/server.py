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
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, AsyncIterator, Iterable, Union

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from .reasoning import ReasoningSplitter, prompt_opens_reasoning

log = logging.getLogger("nanoseek.server")

Number = Annotated[float, Field(strict=True)]  # a JSON number (int or float), never a string
MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 128  # characters per stop string: the engine checks every stop string at every token
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
MIB = 1 << 20
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # Host names a loopback server answers to by default
DEFAULT_MAX_BODY_BYTES = 4 * MIB


# ============================================================================ errors
class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return _AsciiJSON(self.body(), status_code=self.status)


class _AsciiJSON(JSONResponse):
    """JSON with non-ASCII characters escaped: an error message quoting the client's text may hold a lone
    surrogate, which UTF-8 cannot encode (JSONResponse would raise); escaped, it is the same JSON string."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 details → one OpenAI-style 400 naming the field."""
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    kind = first.get("type", "")
    loc = [x for x in first.get("loc", ()) if x != "body"]
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"invalid JSON in the request body{': ' + str(detail) if detail else ''}",
                        code="invalid_json")
    if not loc:
        if kind == "missing":
            return APIError(400, "the request body is missing: send a JSON object", code="invalid_json")
        return APIError(400, f"the request body must be a JSON object ({first.get('msg', '')})",
                        code="invalid_type")
    # Union branches add type tags (e.g. 'list[int]') to the location: keep names and indices only.
    path = [str(x) for x in loc if isinstance(x, int) or (isinstance(x, str) and x.isidentifier())]
    param = str(loc[0])
    where = ".".join(path) or param
    if kind == "missing":
        return APIError(400, f"missing required parameter '{where}'", param=param, code="missing_required_parameter")
    got = first.get("input")
    try:
        shown = json.dumps(got)
    except (TypeError, ValueError):
        shown = repr(got)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 and kind != "json_invalid" else ""
    return APIError(400, f"invalid type for '{where}': {first.get('msg', 'invalid value')}, got {shown}{more}",
                    param=param, code="invalid_type")


# ============================================================================ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as OpenAI's server does


class StreamOptions(_Body):
    include_usage: StrictBool | None = False


class ContentPart(_Body):
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Body):
    role: StrictStr
    content: Union[StrictStr, list[ContentPart], None] = None
    name: StrictStr | None = None
    reasoning_content: StrictStr | None = None


class _Sampling(_Body):
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    n: StrictInt | None = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    user: StrictStr | None = None
    ignore_eos: StrictBool | None = False  # vLLM extension
    stop_token_ids: list[StrictInt] | None = None  # vLLM extension


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None
    tools: Any = None
    functions: Any = None
    response_format: Any = None


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictInt], list[StrictStr], list[list[StrictInt]]]
    logprobs: StrictInt | None = None
    echo: StrictBool | None = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


# ============================================================================ metrics
class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_num(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out


def _num(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else f"{float(x):.1f}"


class Metrics:
    """Counters, gauges and histograms, rendered in the Prometheus text format (version 0.0.4)."""

    TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)
    TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                    1.0, 2.5)
    E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.aborted = 0
        self.engine_errors = 0
        self.ttft = _Histogram(self.TTFT_BUCKETS)
        self.tpot = _Histogram(self.TPOT_BUCKETS)
        self.e2e = _Histogram(self.E2E_BUCKETS)

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def add(self, **deltas: int) -> None:
        with self._lock:
            for key, value in deltas.items():
                setattr(self, key, getattr(self, key) + value)

    def observe_job(self, ttft: float | None, tpot: float | None, e2e: float | None) -> None:
        with self._lock:
            if ttft is not None:
                self.ttft.observe(ttft)
            if tpot is not None:
                self.tpot.observe(tpot)
            if e2e is not None:
                self.e2e.observe(e2e)

    def render(self, waiting: int, running: int, in_flight: int) -> str:
        p = "nanoseek_"
        lines: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            lines.append(f"# HELP {p}{name} {text}")
            lines.append(f"# TYPE {p}{name} {kind}")

        with self._lock:
            head("requests_total", "counter", "HTTP requests by endpoint and status code.")
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'{p}requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            scalars = (
                ("prompt_tokens_total", "counter", "Prompt tokens of accepted generation requests.",
                 self.prompt_tokens),
                ("generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
                ("requests_aborted_total", "counter", "Generation requests aborted (client went away).",
                 self.aborted),
                ("engine_errors_total", "counter", "Engine steps that raised (their requests got a 500).",
                 self.engine_errors),
                ("queue_depth", "gauge", "Generation requests waiting for a cache slot.", waiting),
                ("running_requests", "gauge", "Generation requests holding a cache slot.", running),
                ("requests_in_flight", "gauge", "Generation requests accepted and not finished.", in_flight),
            )
            for name, kind, text, value in scalars:
                head(name, kind, text)
                lines.append(f"{p}{name} {value}")
            histograms = (
                ("time_to_first_token_seconds", "Time from request arrival to its first token.", self.ttft),
                ("time_per_output_token_seconds", "Mean time between output tokens after the first, per request.",
                 self.tpot),
                ("e2e_request_latency_seconds", "Time from request arrival to its last token.", self.e2e),
            )
            for name, text, hist in histograms:
                head(name, "histogram", text)
                lines += [p + x for x in hist.lines(name)]
        return "\n".join(lines) + "\n"


# ============================================================================ engine loop
class _Failure:
    """Put in a request's queue instead of an event when generation failed."""

    def __init__(self, message: str):
        self.message = message


class _Sink:
    """Where the engine thread delivers one job's events: ``(index, item)`` into an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
        self.loop, self.queue, self.index = loop, queue, index

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, item))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class EngineLoop:
    """The one thread that drives the engine (see the module docstring)."""

    IDLE_WAIT_S = 0.5

    def __init__(self, engine, metrics: Metrics):
        self.engine = engine
        self.metrics = metrics
        self._commands: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._start_lock = threading.Lock()
        self.waiting = 0  # snapshots for /metrics and /health, written by the engine thread
        self.running = 0
        self.steps = 0

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---------------------------------------------------------------- commands (any thread)
    def submit(self, request_id: str, prompt_ids: list[int], params, sink: _Sink) -> None:
        self.start()
        self._commands.append(("add", request_id, prompt_ids, params, sink))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._commands.append(("abort", request_id))
        self._wake.set()

    # ---------------------------------------------------------------- engine thread
    def _apply_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "add":
                _, rid, prompt_ids, params, sink = command
                try:
                    self.engine.add_request(prompt_ids, params, request_id=rid)
                except Exception as exc:  # validated before; anything left is the engine's word
                    sink.put(_Failure(f"the engine refused the request: {exc}"))
                else:
                    self._sinks[rid] = sink
            else:
                rid = command[1]
                if self._sinks.pop(rid, None) is not None:
                    self.engine.abort(rid)

    def _fail_all(self, message: str) -> None:
        for rid, sink in list(self._sinks.items()):
            sink.put(_Failure(message))
            with contextlib.suppress(Exception):
                self.engine.abort(rid)
        self._sinks.clear()

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._wake.clear()
            try:
                self._apply_commands()
                busy = engine.has_unfinished()
                if busy:
                    events = engine.step()
                    self.steps += 1
                    for event in events:
                        sink = self._sinks.get(event.request_id)
                        if sink is None:
                            continue
                        sink.put(event)
                        if event.finished:
                            del self._sinks[event.request_id]
            except Exception as exc:  # a failed step fails its requests, never the loop
                log.exception("engine step failed")
                self.metrics.add(engine_errors=1)
                self._fail_all(f"generation failed: {type(exc).__name__}: {exc}")
                busy = True
            self.waiting = engine.num_waiting
            self.running = engine.num_running
            if not busy:
                self._wake.wait(self.IDLE_WAIT_S)
        self._fail_all("the server is shutting down")


# ============================================================================ one HTTP request's jobs
@dataclass
class _Job:
    prompt_ids: list[int]
    params: Any  # SamplingParams
    index: int
    request_id: str = ""
    finished: bool = False
    finish_reason: str | None = None
    tokens: int = 0
    text_tokens: list[int] = field(default_factory=list)  # ids for logprobs (stop tokens left out)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    first_at: float | None = None
    last_at: float | None = None


class _Handle:
    """The engine requests of one HTTP request (n choices × prompts); aborts what is left on close."""

    def __init__(self, server: "_Server", jobs: list[_Job]):
        self.server = server
        self.jobs = jobs
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started = time.perf_counter()
        self.closed = False
        self.failure: str | None = None

    async def events(self) -> AsyncIterator[tuple[_Job, Any]]:
        """Yield ``(job, TokenEvent)`` until every job has finished; raises APIError(500) on failure."""
        remaining = sum(not j.finished for j in self.jobs)
        eos = self.server.eos_ids
        while remaining:
            index, item = await self.queue.get()
            job = self.jobs[index]
            if isinstance(item, _Failure):
                self.failure = item.message
                raise APIError(500, item.message, type="server_error", code="generation_failed")
            now = time.perf_counter()
            if job.first_at is None:
                job.first_at = now
            job.last_at = now
            job.tokens += 1
            job.text += item.text
            is_stop_token = item.finished and item.finish_reason == "stop" and (
                item.token_id in eos or item.token_id in job.params.stop_token_ids)
            if not is_stop_token:
                job.text_tokens.append(item.token_id)
                if item.logprob is not None:
                    job.logprobs.append(float(item.logprob))
            if item.finished:
                job.finished, job.finish_reason = True, item.finish_reason
                remaining -= 1
            yield job, item

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        server = self.server
        server.in_flight -= len(self.jobs)
        aborted = 0
        for job in self.jobs:
            if not job.finished:  # (after a failure the engine thread has dropped them already: no-op)
                server.loop.abort(job.request_id)
                aborted += self.failure is None
            else:
                ttft = job.first_at - self.started if job.first_at is not None else None
                tpot = ((job.last_at - job.first_at) / (job.tokens - 1)) if job.tokens > 1 else None
                e2e = job.last_at - self.started if job.last_at is not None else None
                server.metrics.observe_job(ttft, tpot, e2e)
        server.metrics.add(generation_tokens=sum(j.tokens for j in self.jobs), aborted=aborted)


class _EventStream(StreamingResponse):
    """Server-sent events that stop, and run ``on_close``, as soon as the client goes away."""

    def __init__(self, chunks: AsyncIterator[str], on_close):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            group.cancel_scope.cancel()
                            return

                group.start_soon(watch)
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                group.cancel_scope.cancel()
        except Exception as exc:
            if not _client_gone(exc):
                raise
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self.body_iterator.aclose()
                self._on_close()


def _client_gone(exc: BaseException) -> bool:
    """An OSError from ``send`` (servers on ASGI 2.4), possibly inside a task group's exception group."""
    inner = getattr(exc, "exceptions", None)
    if inner:
        return all(_client_gone(e) for e in inner)
    return isinstance(exc, OSError)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ============================================================================ the server state
class _Server:
    def __init__(self, engine, tokenizer, model_name: str, api_key: str | None, max_queue: int,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, allowed_hosts: Iterable[str] | None = None):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        self.max_body_bytes = int(max_body_bytes)
        self.allowed_hosts = None if allowed_hosts is None else tuple(dict.fromkeys(
            _host_name(h) for h in allowed_hosts))
        self.max_token_bytes = _max_token_bytes(tokenizer)
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key or None
        self.max_queue = max_queue
        self.max_slots = int(getattr(engine, "max_slots", 0) or engine.cache.n_slots)
        self.capacity = self.max_slots + max_queue
        self.max_seq_len = int(engine.max_seq_len)
        self.vocab_size = int(engine.config.vocab_size)
        self.eos_ids = frozenset(getattr(engine, "eos_token_ids", ()) or ())
        self.metrics = Metrics()
        self.loop = EngineLoop(engine, self.metrics)
        self.in_flight = 0
        self.created = int(time.time())

    # ---------------------------------------------------------------- validation
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist. This server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def sampling_params(self, body: _Sampling, prompt_lens: list[int], max_tokens: int | None,
                        max_tokens_name: str, prompt_name: str, logprobs: bool) -> list[list[Any]]:
        """Per prompt, the SamplingParams of each of its ``n`` choices (400 on any bad value)."""
        from .sampling import SamplingParams

        n = 1 if body.n is None else body.n
        if not 1 <= n <= MAX_N:
            raise APIError(400, f"n must be between 1 and {MAX_N}, got {n}", param="n", code="invalid_value")
        if body.seed is not None and not SEED_MIN <= body.seed <= SEED_MAX - (n - 1):
            choices = f" (the {n} choices use seeds seed to seed+{n - 1})" if n > 1 else ""
            raise APIError(400, f"seed must be an integer from {SEED_MIN} to {SEED_MAX - (n - 1)}{choices}, got "
                                f"{body.seed}", param="seed", code="invalid_value")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(body, name)
            if value not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported by this server (got {value}); leave it at 0",
                               param=name, code="unsupported_parameter")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias",
                           code="unsupported_parameter")
        temperature = 1.0 if body.temperature is None else float(body.temperature)
        if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
            raise APIError(400, f"temperature must be between 0 and 2, got {body.temperature}",
                           param="temperature", code="invalid_value")
        top_p = 1.0 if body.top_p is None else float(body.top_p)
        if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
            raise APIError(400, f"top_p must be in (0, 1], got {body.top_p}", param="top_p", code="invalid_value")
        top_k = 0 if body.top_k in (None, -1) else body.top_k
        if top_k < 0:
            raise APIError(400, f"top_k must be -1 or 0 (off) or a positive integer, got {body.top_k}",
                           param="top_k", code="invalid_value")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP or not all(stop):
            raise APIError(400, f"stop must be at most {MAX_STOP} non-empty strings", param="stop",
                           code="invalid_value")
        for i, text in enumerate(stop):
            _utf8(text, "stop" if isinstance(body.stop, str) else f"stop[{i}]", param="stop")
        longest = max(range(len(stop)), key=lambda i: len(stop[i]), default=None)
        if longest is not None and len(stop[longest]) > MAX_STOP_CHARS:
            where = "stop" if isinstance(body.stop, str) else f"stop[{longest}]"
            raise APIError(400, f"stop strings must be at most {MAX_STOP_CHARS} characters long; {where} has "
                                f"{len(stop[longest])}", param="stop", code="invalid_value")
        stop_ids = list(body.stop_token_ids or [])
        if any(not 0 <= t < self.vocab_size for t in stop_ids):
            raise APIError(400, f"stop_token_ids must lie in [0, {self.vocab_size})", param="stop_token_ids",
                           code="invalid_value")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"{max_tokens_name} must be at least 1, got {max_tokens}",
                           param=max_tokens_name, code="invalid_value")
        limit = self.max_seq_len
        out = []
        for plen in prompt_lens:
            if plen >= limit:
                raise APIError(400, f"This model's maximum context length is {limit} tokens, but {plen} tokens "
                                    f"were given in the {prompt_name}, leaving no room for a completion. "
                                    f"Please shorten the {prompt_name}.",
                               param=prompt_name, code="context_length_exceeded")
            want = limit - plen if max_tokens is None else max_tokens
            if plen + want > limit:
                raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                    f"requested {plen + want} tokens ({plen} in the {prompt_name}, {want} for "
                                    f"the completion). Please reduce the length of the {prompt_name} or "
                                    f"{max_tokens_name} (at most {limit - plen} here).",
                               param=max_tokens_name, code="context_length_exceeded")
            row = []
            for i in range(n):
                seed = None if body.seed is None else body.seed + i
                try:
                    row.append(SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=want,
                                              stop=stop, stop_token_ids=stop_ids, seed=seed, logprobs=logprobs,
                                              ignore_eos=bool(body.ignore_eos)))
                except ValueError as exc:
                    raise APIError(400, str(exc), code="invalid_value") from None
            out.append(row)
        return out

    def check_text_size(self, text: str, name: str) -> None:
        """400 for text that is not Unicode (a lone surrogate, which JSON can carry), or that cannot fit the
        context whatever its tokens, told without tokenising it."""
        size = len(_utf8(text, name))
        if self.max_token_bytes is None:
            return
        least = -(-size // self.max_token_bytes)
        if least >= self.max_seq_len:
            raise APIError(400, f"This model's maximum context length is {self.max_seq_len} tokens, but the text "
                                f"of the {name} is {size} bytes, at least {least} tokens (no token is longer than "
                                f"{self.max_token_bytes} bytes). Please shorten the {name}.",
                           param=name, code="context_length_exceeded")

    def check_prompt_ids(self, ids: list[int], name: str) -> None:
        if not ids:
            raise APIError(400, f"the {name} is empty: give at least one token", param=name, code="invalid_value")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} in the {name} is outside the vocabulary [0, {self.vocab_size})",
                           param=name, code="invalid_value")

    # ---------------------------------------------------------------- running
    def start(self, prompts: list[list[int]], params: list[list[Any]]) -> _Handle:
        jobs = [_Job(p, sp, 0) for p, row in zip(prompts, params) for sp in row]
        if len(jobs) > self.capacity:  # even an idle server cannot take it: retrying would never help
            n = len(params[0]) if params else 1
            asked = f"n={n} choices × {len(prompts)} prompts" if len(prompts) > 1 else f"n={n} choices"
            raise APIError(400, f"this request asks for {len(jobs)} generations ({asked}) but this server holds at "
                                f"most {self.capacity} at once ({self.max_slots} slots + max_queue "
                                f"{self.max_queue}); lower n or send fewer prompts per request",
                           param="n" if n > 1 else "prompt", code="invalid_value")
        if self.in_flight + len(jobs) > self.capacity:
            raise APIError(429, f"the server is busy: {self.in_flight} requests in flight and the queue holds "
                                f"{self.capacity} ({self.max_slots} slots + max_queue {self.max_queue}); "
                                f"retry later", type="rate_limit_error", code="queue_full")
        handle = _Handle(self, jobs)
        self.in_flight += len(jobs)
        self.metrics.add(prompt_tokens=sum(len(p) for p in prompts))
        base = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        for i, job in enumerate(jobs):
            job.index = i
            job.request_id = f"{base}-{i}"
            self.loop.submit(job.request_id, job.prompt_ids, job.params, _Sink(loop, handle.queue, i))
        return handle

    async def run_to_end(self, handle: _Handle, request: Request) -> bool:
        """Wait for all jobs; False (everything aborted) if the client disconnected first."""

        async def consume() -> None:
            async for _ in handle.events():
                pass

        async def disconnected() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        work = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()  # raises the APIError of a failed generation
                return True
            return False
        finally:
            for task in (work, watch):
                task.cancel()
            handle.close()

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    @staticmethod
    async def off_loop(fn, *args):
        """``fn(*args)`` in a worker thread: tokenising a long text must not stall the event loop."""
        return await anyio.to_thread.run_sync(fn, *args)


def _utf8(text: str, name: str, param: str | None = None) -> bytes:
    """``text`` in UTF-8; a 400 naming ``name`` when it holds a lone surrogate (``"\\ud800"`` in JSON)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{name} is not valid Unicode text: it holds the lone surrogate "
                            f"\\u{ord(text[exc.start]):04x} at character {exc.start}", param=param or name,
                       code="invalid_value") from None


def _max_token_bytes(tokenizer) -> int | None:
    """The most bytes of text one token stands for, where that bounds the tokens of a text from below.

    A byte-level BPE without a normalizer (nanoseek's tokenizers) maps every byte of the text to
    exactly one token, so a text of ``B`` bytes has at least ``B / max_token_bytes`` tokens: an
    over-long prompt is refused without being tokenised. None when the tokenizer could drop or
    shrink text (a normalizer, a pre-tokenizer other than byte-level/digits/split).
    """
    backend = getattr(tokenizer, "backend", None)
    try:
        state = json.loads(backend.to_str())
        vocab = backend.get_vocab(with_added_tokens=True)
    except Exception:
        return None
    if state.get("normalizer") is not None:
        return None
    pre = state.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") if isinstance(step, dict) else None for step in steps]
    if "ByteLevel" not in kinds or any(kind not in ("ByteLevel", "Digits", "Split") for kind in kinds):
        return None
    if any(isinstance(step, dict) and step.get("behavior") == "Removed" for step in steps):
        return None
    return max((len(token.encode("utf-8")) for token in vocab), default=0) or None


# ============================================================================ the app
_ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics", "/")


def _endpoint_label(path: str) -> str:
    """The ``endpoint`` label of a path (unknown paths share one label, so they cannot blow up /metrics)."""
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class _Gate:
    """Pure ASGI middleware: the Host allow-list, the API-key check on ``/v1/*`` and ``/metrics``, the
    request-body limit, and request counting by endpoint/status.

    The body is read here, at most ``max_body_bytes`` of it: a declared ``Content-Length`` over the
    limit is refused before any of the body is read, a chunked body as soon as it passes the limit
    (413, ``Connection: close``); the app then gets the body that was read in one message.
    """

    def __init__(self, app, server: _Server):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = _endpoint_label(path)
        counted = False

        async def counting_send(message) -> None:
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True
                self.server.metrics.count_request(endpoint, message["status"])
            await send(message)

        allowed = self.server.allowed_hosts
        host = _header(scope, b"host")  # (none: an HTTP/1.0 client, never a browser)
        if allowed is not None and host is not None and _host_name(host) not in allowed:
            name = _host_name(host).strip("[]") or host
            error = APIError(421, f"this server does not answer to the Host {host!r} (only {', '.join(allowed)}): "
                                  f"requests under other names are refused, as a web page could reach a "
                                  f"loopback server through a name it controls (DNS rebinding); to serve under "
                                  f"that name, start the server with --allowed-host {name}",
                             code="host_not_allowed")
            response = error.response()
            response.headers["Connection"] = "close"
            return await response(scope, receive, counting_send)

        key = self.server.api_key
        if key and (path.startswith("/v1/") or path == "/metrics") and scope.get("method") != "OPTIONS":
            header = _header(scope, b"authorization") or ""
            scheme, _, given = header.partition(" ")
            if not header:
                error = APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
            elif scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
                error = APIError(401, "incorrect API key provided", code="invalid_api_key")
            else:
                error = None
            if error is not None:
                response = error.response()
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, counting_send)

        limit = self.server.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
            refusal = _too_large(f"the request body is {int(declared)} bytes", limit)
            return await refusal(scope, receive, counting_send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body was complete: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _too_large(f"the request body is more than {limit} bytes", limit)(
                    scope, receive, counting_send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = [b"".join(chunks)]
        del chunks

        async def replay():
            if body:  # the whole body first, then the client's next messages (http.disconnect)
                return {"type": "http.request", "body": body.pop(), "more_body": False}
            return await receive()

        await self.app(scope, replay, counting_send)


def _host_name(host: str) -> str:
    """A Host header (or an allowed name) without its port, lower case: ``[::1]:8000`` → ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    if host.count(":") > 1:  # a bare IPv6 address (an --allowed-host value)
        return f"[{host}]"
    name, sep, port = host.rpartition(":")
    host = name if sep and port.isascii() and port.isdigit() else host
    return host[:-1] if host.endswith(".") else host  # 'localhost.' is 'localhost'


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _too_large(what: str, limit: int) -> JSONResponse:
    response = APIError(413, f"{what}; this server accepts at most {limit} bytes ({limit / MIB:g} MiB, "
                             "nanoseek serve --max-body-mb)", code="request_too_large").response()
    response.headers["Connection"] = "close"  # the rest of the body is not read: do not reuse the connection
    return response


def _message_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise APIError(400, f"messages[{index}].content[{j}]: only text parts are supported, got type "
                                f"'{part.type}'", param="messages", code="invalid_value")
        parts.append(part.text)
    return "".join(parts)


def _render_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    if not body.messages:
        raise APIError(400, "messages must hold at least one message", param="messages", code="invalid_value")
    out = []
    for i, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role '{message.role}' is not supported (system, developer, user "
                                f"or assistant)", param="messages", code="invalid_value")
        content = _message_text(message, i)
        _utf8(content, f"messages[{i}].content", param="messages")
        out.append({"role": role, "content": content})
    return out


def _check_unsupported_chat(body: ChatCompletionRequest) -> None:
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise APIError(400, f"{name} are not supported by this server", param=name, code="unsupported_parameter")
    fmt = body.response_format
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise APIError(400, "response_format other than {'type': 'text'} is not supported", param="response_format",
                       code="unsupported_parameter")
    if body.top_logprobs not in (None, 0):
        raise APIError(400, f"top_logprobs is not supported (got {body.top_logprobs}): use logprobs=true for the "
                            "sampled tokens' log-probabilities", param="top_logprobs", code="unsupported_parameter")


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
    server = _Server(engine, tokenizer, model_name, api_key, max_queue, max_body_bytes, allowed_hosts)

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
    app.add_middleware(_Gate, server=server)

    # ---------------------------------------------------------------- error handlers
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            error = APIError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            error = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                             code="method_not_allowed")
        else:
            error = APIError(exc.status_code, str(exc.detail), code=None)
        response = error.response()
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        server.metrics.count_request(_endpoint_label(request.url.path), 500)  # sent outside the counting gate
        return APIError(500, f"internal server error: {type(exc).__name__}", type="server_error").response()

    # ---------------------------------------------------------------- plain endpoints
    def model_card() -> dict[str, Any]:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "nanoseek",
                "max_model_len": server.max_seq_len}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        server.check_model(model_id)
        return model_card()

    @app.get("/health")
    async def health():
        dead = server.loop.started and not server.loop.alive
        body = {"status": "engine loop stopped" if dead else "ok", "model": server.model_name,
                "running": server.loop.running, "waiting": server.loop.waiting, "in_flight": server.in_flight}
        return JSONResponse(body, status_code=503 if dead else 200)

    @app.get("/metrics")
    async def metrics():
        text = server.metrics.render(server.loop.waiting, server.loop.running, server.in_flight)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        page = resources.files("nanoseek.infer").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("{{MODEL_NAME}}", _html_escape(server.model_name)))

    # ---------------------------------------------------------------- completions
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        for name, bad in (("echo", bool(body.echo)), ("best_of", body.best_of not in (None, 1)),
                          ("suffix", bool(body.suffix))):
            if bad:
                raise APIError(400, f"{name} is not supported by this server", param=name,
                               code="unsupported_parameter")
        if body.logprobs not in (None, 0):
            raise APIError(400, f"logprobs={body.logprobs} asks for top alternatives, which this server does not "
                                "compute; use logprobs=0 for the sampled tokens' log-probabilities",
                           param="logprobs", code="unsupported_parameter")
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(x, str) for x in prompt)):
            texts = [prompt] if isinstance(prompt, str) else list(prompt)

            def encode_texts() -> list[list[int]]:
                for text in texts:
                    server.check_text_size(text, "prompt")
                return tokenizer.encode_batch(texts)

            prompts = await server.off_loop(encode_texts)
        elif prompt and all(isinstance(x, int) for x in prompt):
            prompts = [list(prompt)]
        elif prompt:
            prompts = [list(x) for x in prompt]
        else:
            raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
        for ids in prompts:
            server.check_prompt_ids(ids, "prompt")
        want_logprobs = body.logprobs is not None
        params = server.sampling_params(body, [len(p) for p in prompts], body.max_tokens, "max_tokens", "prompt",
                                        want_logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        handle = server.start(prompts, params)

        def logprobs_of(job: _Job) -> dict[str, Any] | None:
            if not want_logprobs:
                return None
            tokens = [server.token_text(t) for t in job.text_tokens]
            offsets, pos = [], 0
            for t in tokens:
                offsets.append(pos)
                pos += len(t)
            return {"tokens": tokens, "token_logprobs": job.logprobs[: len(tokens)], "top_logprobs": None,
                    "text_offset": offsets}

        def usage() -> dict[str, int]:
            completion = sum(j.tokens for j in handle.jobs)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        if not body.stream:
            if not await server.run_to_end(handle, request):
                return Response(status_code=499)
            choices = [{"index": j.index, "text": j.text, "logprobs": logprobs_of(j),
                        "finish_reason": j.finish_reason} for j in handle.jobs]
            return {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                    "choices": choices, "usage": usage(), "system_fingerprint": None}

        async def chunks() -> AsyncIterator[str]:
            sent_logprobs = [0] * len(handle.jobs)
            try:
                async for job, event in handle.events():
                    lp = None
                    if want_logprobs and len(job.text_tokens) > sent_logprobs[job.index]:
                        start = sent_logprobs[job.index]
                        tokens = [server.token_text(t) for t in job.text_tokens[start:]]
                        offsets = [len(job.text) - len(event.text)] * len(tokens)
                        lp = {"tokens": tokens, "token_logprobs": job.logprobs[start:], "top_logprobs": None,
                              "text_offset": offsets}
                        sent_logprobs[job.index] = len(job.text_tokens)
                    if event.text or event.finished or lp:
                        yield _sse({"id": rid, "object": "text_completion", "created": created,
                                    "model": server.model_name,
                                    "choices": [{"index": job.index, "text": event.text, "logprobs": lp,
                                                 "finish_reason": event.finish_reason if event.finished else None}]})
            except APIError as err:
                yield _sse(err.body())
            else:
                if include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": created,
                                "model": server.model_name, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return _EventStream(chunks(), handle.close)

    # ---------------------------------------------------------------- chat completions
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        server.check_model(body.model)
        _check_unsupported_chat(body)
        messages = _render_messages(body)

        def render_and_encode() -> tuple[str, list[int]]:
            try:  # message contents are plain text: '<|system|>' written by a user is not a system turn
                pieces = tokenizer.chat_pieces(messages, add_generation_prompt=True)
            except Exception as exc:  # a template that refuses the conversation
                raise APIError(400, f"the chat template refused these messages: {exc}", param="messages",
                               code="invalid_value") from None
            rendered = "".join(piece for piece, _ in pieces)
            server.check_text_size(rendered, "messages")
            return rendered, tokenizer.encode_chat_pieces(pieces)

        text, prompt_ids = await server.off_loop(render_and_encode)
        server.check_prompt_ids(prompt_ids, "messages")
        in_reasoning = prompt_opens_reasoning(text)
        max_tokens, name = body.max_tokens, "max_tokens"
        if body.max_completion_tokens is not None:
            max_tokens, name = body.max_completion_tokens, "max_completion_tokens"
        want_logprobs = bool(body.logprobs)
        params = server.sampling_params(body, [len(prompt_ids)], max_tokens, name, "messages", want_logprobs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        handle = server.start([prompt_ids], params)

        def logprob_entries(job: _Job, start: int) -> list[dict[str, Any]]:
            out = []
            for t, lp in zip(job.text_tokens[start:], job.logprobs[start:]):
                piece = server.token_text(t)
                out.append({"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8")), "top_logprobs": []})
            return out

        def usage() -> dict[str, int]:
            completion = sum(j.tokens for j in handle.jobs)
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                    "total_tokens": len(prompt_ids) + completion}

        if not body.stream:
            if not await server.run_to_end(handle, request):
                return Response(status_code=499)
            choices = []
            for job in handle.jobs:
                splitter = ReasoningSplitter(in_reasoning)
                splitter.feed(job.text)
                splitter.finish()
                message = {"role": "assistant", "content": splitter.content,
                           "reasoning_content": splitter.reasoning if splitter.saw_reasoning else None}
                choices.append({"index": job.index, "message": message,
                                "logprobs": {"content": logprob_entries(job, 0)} if want_logprobs else None,
                                "finish_reason": job.finish_reason})
            return {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
                    "choices": choices, "usage": usage(), "system_fingerprint": None}

        def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None,
                  logprobs: Any = None) -> str:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                         "model": server.model_name, "system_fingerprint": None,
                         "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                      "finish_reason": finish_reason}]})

        async def chunks() -> AsyncIterator[str]:
            splitters = [ReasoningSplitter(in_reasoning) for _ in handle.jobs]
            sent_logprobs = [0] * len(handle.jobs)
            for job in handle.jobs:
                yield chunk(job.index, {"role": "assistant", "content": ""})
            try:
                async for job, event in handle.events():
                    splitter = splitters[job.index]
                    reasoning, content = splitter.feed(event.text)
                    if event.finished:
                        more_r, more_c = splitter.finish()
                        reasoning, content = reasoning + more_r, content + more_c
                    delta: dict[str, Any] = {}
                    if reasoning:
                        delta["reasoning_content"] = reasoning
                    if content:
                        delta["content"] = content
                    lp = None
                    if want_logprobs and len(job.logprobs) > sent_logprobs[job.index]:
                        lp = {"content": logprob_entries(job, sent_logprobs[job.index])}
                        sent_logprobs[job.index] = len(job.logprobs)
                    if delta or lp:
                        yield chunk(job.index, delta, None, lp)
                    if event.finished:
                        yield chunk(job.index, {}, event.finish_reason)
            except APIError as err:
                yield _sse(err.body())
            else:
                if include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": server.model_name, "system_fingerprint": None, "choices": [],
                                "usage": usage()})
            yield "data: [DONE]\n\n"

        return _EventStream(chunks(), handle.close)

    return app


def _html_escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
            .replace("'", "&#39;"))


# ============================================================================ `nanoseek serve`
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(bind_host: str, extra: Iterable[str] = ()) -> list[str] | None:
    """The Host names ``nanoseek serve --host BIND_HOST --allowed-host EXTRA...`` answers to (None: any).

    A loopback server answers to ``localhost``, ``127.0.0.1`` and ``[::1]`` (any port) and the
    ``extra`` names: a web page cannot reach it through a name of its own that resolves to 127.0.0.1
    (DNS rebinding), key or no key. Other binds check the Host only when ``extra`` names are given;
    ``*`` among them turns the check off.
    """
    extra = [h for h in extra or () if h]
    if "*" in extra:
        return None
    if not extra and not _is_loopback(bind_host):
        return None
    names = list(LOOPBACK_HOSTS)
    if bind_host and bind_host not in ("0.0.0.0", "::", "[::]"):
        names.append(bind_host)
    return list(dict.fromkeys(_host_name(h) for h in names + extra))


def serve_main(args: argparse.Namespace) -> int:
    """``nanoseek serve --ckpt DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...``."""
    import uvicorn

    from ..errors import NanoseekError
    from ..hf import load_with_tokenizer
    from .engine import Engine

    api_key = getattr(args, "api_key", None) or os.environ.get("NANOSEEK_API_KEY") or None
    host = getattr(args, "host", "127.0.0.1")
    if not _is_loopback(host) and not api_key:
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
                    speculative="mtp" if getattr(args, "speculative", False) else None)
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
