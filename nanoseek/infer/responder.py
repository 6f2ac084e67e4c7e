"""The one responder of both generation endpoints: run the jobs, answer in one body or as a stream.

Non-streamed: wait for every job, or abort them all when the client disconnects first (the client
then gets nothing; the status logged is 499). Streamed: server-sent events ``data: {json}\\n\\n``,
one choice per chunk, then (``stream_options.include_usage``) a chunk with ``usage`` and no
choices, then ``data: [DONE]``; a generation that fails mid-stream sends its error body as an event
instead of the usage. A client that goes away mid-stream has its jobs aborted at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from .protocol import SSE_DONE, APIError, SamplingRequest, sse
from .replies import Reply
from .sampling import SamplingParams
from .streams import Admission, Generation


async def respond(request: Request, body: SamplingRequest, reply: Reply, admission: Admission,
                  prompts: list[list[int]], params: list[list[SamplingParams]]) -> Response | dict:
    """Generate ``params[i]``'s choices for each prompt ``prompts[i]`` and answer as ``body`` asks."""
    generation = admission.start(prompts, params)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(_chunks(generation, reply, include_usage), generation.close)
    if not await _run_to_end(generation, request):
        return Response(status_code=499)
    return reply.whole(generation)


async def _chunks(generation: Generation, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    for choice in reply.begin_stream(generation.jobs):
        yield reply.chunk([choice])
    try:
        async for job, event in generation.events():
            for choice in reply.stream_choices(job, event):
                yield reply.chunk([choice])
    except APIError as err:
        yield sse(err.body())
    else:
        if include_usage:
            yield reply.chunk([], generation.usage())
    yield SSE_DONE


async def _run_to_end(generation: Generation, request: Request) -> bool:
    """Wait for all jobs; False (everything aborted) if the client disconnected first."""

    async def consume() -> None:
        async for _ in generation.events():
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
        generation.close()


class EventStream(StreamingResponse):
    """Server-sent events that stop, and run ``on_close``, as soon as the client goes away."""

    def __init__(self, chunks: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        """Send the chunks while watching for ``http.disconnect``; always close the chunks and run ``on_close``."""
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
