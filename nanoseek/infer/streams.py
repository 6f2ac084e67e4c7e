"""The engine requests of HTTP requests: admission against the server's capacity, and their event streams.

One HTTP request asks for ``n`` choices of each of its prompts: each is one engine request, a
:class:`Job`. :meth:`Admission.start` admits them all or none (400 when they could never fit, 429
when the server is full), posts them to the :class:`~nanoseek.infer.engine_loop.EngineLoop` and
returns their :class:`Generation`, whose :meth:`~Generation.events` yields each job's tokens as the
engine thread delivers them. Closing a generation aborts its unfinished jobs and records its
latencies and tokens in the metrics.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from .engine import TokenEvent
from .engine_loop import EngineLoop, Failure, Sink
from .metrics import Metrics
from .protocol import APIError
from .sampling import SamplingParams


@dataclass
class Job:
    """One engine request of an HTTP request (one choice of one prompt) and what it has generated so far."""

    prompt_ids: list[int]
    params: SamplingParams
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

    def record(self, event: TokenEvent, eos_ids: frozenset[int]) -> None:
        """Add one token event to the job's text, tokens, logprobs and timings."""
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.tokens += 1
        self.text += event.text
        is_stop_token = event.finished and event.finish_reason == "stop" and (
            event.token_id in eos_ids or event.token_id in self.params.stop_token_ids)
        if not is_stop_token:
            self.text_tokens.append(event.token_id)
            if event.logprob is not None:
                self.logprobs.append(float(event.logprob))
        if event.finished:
            self.finished, self.finish_reason = True, event.finish_reason


class Admission:
    """Admits generations into the engine loop while at most ``max_slots + max_queue`` are in flight."""

    def __init__(self, loop: EngineLoop, metrics: Metrics, max_slots: int, max_queue: int, eos_ids: frozenset[int]):
        self.loop = loop
        self.metrics = metrics
        self.max_slots = max_slots
        self.max_queue = max_queue
        self.capacity = max_slots + max_queue
        self.eos_ids = eos_ids
        self.in_flight = 0  # jobs accepted and not closed

    def start(self, prompts: list[list[int]], params: list[list[SamplingParams]]) -> Generation:
        """Post one job per prompt and choice (``params[i]`` holds prompt i's choices) to the engine loop."""
        jobs = [Job(p, sp, 0) for p, row in zip(prompts, params) for sp in row]
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
        prompt_tokens = sum(len(p) for p in prompts)
        generation = Generation(self, jobs, prompt_tokens)
        self.in_flight += len(jobs)
        self.metrics.add(prompt_tokens=prompt_tokens)
        base = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        for i, job in enumerate(jobs):
            job.index = i
            job.request_id = f"{base}-{i}"
            self.loop.submit(job.request_id, job.prompt_ids, job.params, Sink(loop, generation.queue, i))
        return generation


class Generation:
    """The jobs of one HTTP request (n choices × prompts); :meth:`close` aborts what is left of them."""

    def __init__(self, admission: Admission, jobs: list[Job], prompt_tokens: int):
        self.admission = admission
        self.jobs = jobs
        self.prompt_tokens = prompt_tokens  # each prompt once, whatever n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.started = time.perf_counter()
        self.closed = False
        self.failure: str | None = None

    async def events(self) -> AsyncIterator[tuple[Job, TokenEvent]]:
        """Yield ``(job, TokenEvent)`` until every job has finished; raises APIError(500) on failure."""
        remaining = sum(not j.finished for j in self.jobs)
        while remaining:
            index, item = await self.queue.get()
            job = self.jobs[index]
            if isinstance(item, Failure):
                self.failure = item.message
                raise APIError(500, item.message, type="server_error", code="generation_failed")
            job.record(item, self.admission.eos_ids)
            if item.finished:
                remaining -= 1
            yield job, item

    def usage(self) -> dict[str, int]:
        """OpenAI's ``usage``: each prompt's tokens once (whatever ``n``), and every token generated."""
        completion = sum(j.tokens for j in self.jobs)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def close(self) -> None:
        """Abort the unfinished jobs, give their capacity back, and record the finished ones' latencies."""
        if self.closed:
            return
        self.closed = True
        admission = self.admission
        admission.in_flight -= len(self.jobs)
        aborted = 0
        for job in self.jobs:
            if not job.finished:  # (after a failure the engine thread has dropped them already: no-op)
                admission.loop.abort(job.request_id)
                aborted += self.failure is None
            else:
                ttft = job.first_at - self.started if job.first_at is not None else None
                tpot = ((job.last_at - job.first_at) / (job.tokens - 1)) if job.tokens > 1 else None
                e2e = job.last_at - self.started if job.last_at is not None else None
                admission.metrics.observe_job(ttft, tpot, e2e)
        admission.metrics.add(generation_tokens=sum(j.tokens for j in self.jobs), aborted=aborted)
