"""The one thread that drives the :class:`~nanoseek.infer.engine.Engine` of ``nanoseek serve``.

HTTP handlers never touch the engine: they post "add" and "abort" commands to the thread, which
applies them between steps, runs ``engine.step()`` while work exists and hands every
:class:`~nanoseek.infer.engine.TokenEvent` to the request's :class:`Sink` (an ``asyncio.Queue`` fed
with ``loop.call_soon_threadsafe``). A step that raises fails the requests it held (each sink gets
a :class:`Failure`), never the loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from typing import Any

from .metrics import Metrics
from .sampling import SamplingParams

log = logging.getLogger("nanoseek.server")


class Failure:
    """Put in a request's queue instead of an event when generation failed."""

    def __init__(self, message: str):
        self.message = message


class Sink:
    """Where the engine thread delivers one job's events: ``(index, item)`` into an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
        self.loop, self.queue, self.index = loop, queue, index

    def put(self, item: Any) -> None:
        """Hand ``item`` (a TokenEvent or a Failure) to the event loop; called from the engine thread."""
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
        self._sinks: dict[str, Sink] = {}  # engine thread only
        self._start_lock = threading.Lock()
        self.waiting = 0  # snapshots for /metrics and /health, written by the engine thread
        self.running = 0
        self.steps = 0

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the thread (again, if it died); a no-op while it runs."""
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread: the requests it still holds fail with "the server is shutting down"."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def started(self) -> bool:
        """Whether the thread was ever started."""
        return self._thread is not None

    @property
    def alive(self) -> bool:
        """Whether the thread runs (False after a crash: /health answers 503)."""
        return self._thread is not None and self._thread.is_alive()

    # ---------------------------------------------------------------- commands (any thread)
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: Sink) -> None:
        """Queue a request for the engine; its events go to ``sink``."""
        self.start()
        self._commands.append(("add", request_id, prompt_ids, params, sink))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Queue the abort of a request (its slot is free before the next step)."""
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
                    sink.put(Failure(f"the engine refused the request: {exc}"))
                else:
                    self._sinks[rid] = sink
            else:
                rid = command[1]
                if self._sinks.pop(rid, None) is not None:
                    self.engine.abort(rid)

    def _fail_all(self, message: str) -> None:
        for rid, sink in list(self._sinks.items()):
            sink.put(Failure(message))
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
