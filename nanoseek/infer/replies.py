"""How ``/v1/completions`` and ``/v1/chat/completions`` shape their answers: choices, stream chunks, logprobs.

Both endpoints answer alike (:func:`nanoseek.infer.responder.respond`): one JSON body with a choice
per job, or a stream of chunks of one choice each, then a usage chunk and ``[DONE]``. A reply
object holds what differs: the object names, how a finished job becomes a choice and how each
token event becomes chunk choices. A chat reply splits ``<think>…</think>`` off into
``reasoning_content`` (:class:`~nanoseek.infer.reasoning.ReasoningSplitter`); a completion reply
gives the raw text.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from typing import Any

from .engine import TokenEvent
from .protocol import sse
from .reasoning import ReasoningSplitter
from .streams import Generation, Job


class Reply(ABC):
    """One request's answer: the envelope both endpoints share; subclasses shape the choices."""

    id_prefix = ""
    object_name = ""  # of the whole answer
    chunk_object = ""  # of a stream chunk
    chunk_has_fingerprint = False

    def __init__(self, model_name: str, tokenizer, want_logprobs: bool):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.want_logprobs = want_logprobs
        self.sent_logprobs: list[int] = []  # per job: the logprobs already streamed

    def whole(self, generation: Generation) -> dict[str, Any]:
        """The non-streamed answer of a finished generation."""
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model_name,
                "choices": [self.choice(job) for job in generation.jobs], "usage": generation.usage(),
                "system_fingerprint": None}

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        """One stream chunk (an SSE event) carrying ``choices`` and, on the last one, ``usage``."""
        body: dict[str, Any] = {"id": self.id, "object": self.chunk_object, "created": self.created,
                                "model": self.model_name}
        if self.chunk_has_fingerprint:
            body["system_fingerprint"] = None
        body["choices"] = choices
        if usage is not None:
            body["usage"] = usage
        return sse(body)

    def token_text(self, token_id: int) -> str:
        """The text of one token, as logprobs name it."""
        return self.tokenizer.decode([token_id])

    def begin_stream(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """Start streaming ``jobs``: the choices to send before any token (each in its own chunk)."""
        self.sent_logprobs = [0] * len(jobs)
        return []

    @abstractmethod
    def choice(self, job: Job) -> dict[str, Any]:
        """A finished job as a choice of the non-streamed answer."""

    @abstractmethod
    def stream_choices(self, job: Job, event: TokenEvent) -> list[dict[str, Any]]:
        """The choices (each sent in its own chunk) for one token event of ``job``."""


class CompletionReply(Reply):
    """``text_completion``: the raw text; logprobs as ``tokens``/``token_logprobs``/``text_offset``."""

    id_prefix = "cmpl"
    object_name = chunk_object = "text_completion"

    def choice(self, job: Job) -> dict[str, Any]:
        """``{"index", "text", "logprobs", "finish_reason"}``."""
        logprobs = None
        if self.want_logprobs:
            tokens = [self.token_text(t) for t in job.text_tokens]
            offsets, pos = [], 0
            for t in tokens:
                offsets.append(pos)
                pos += len(t)
            logprobs = {"tokens": tokens, "token_logprobs": job.logprobs[: len(tokens)], "top_logprobs": None,
                        "text_offset": offsets}
        return {"index": job.index, "text": job.text, "logprobs": logprobs, "finish_reason": job.finish_reason}

    def stream_choices(self, job: Job, event: TokenEvent) -> list[dict[str, Any]]:
        """The event's text (and the logprobs of tokens not sent yet), or nothing while text is held back."""
        logprobs = None
        start = self.sent_logprobs[job.index]
        if self.want_logprobs and len(job.text_tokens) > start:
            tokens = [self.token_text(t) for t in job.text_tokens[start:]]
            offsets = [len(job.text) - len(event.text)] * len(tokens)
            logprobs = {"tokens": tokens, "token_logprobs": job.logprobs[start:], "top_logprobs": None,
                        "text_offset": offsets}
            self.sent_logprobs[job.index] = len(job.text_tokens)
        if not (event.text or event.finished or logprobs):
            return []
        return [{"index": job.index, "text": event.text, "logprobs": logprobs,
                 "finish_reason": event.finish_reason if event.finished else None}]


class ChatReply(Reply):
    """``chat.completion``: an assistant message with ``reasoning_content`` split off; logprobs per token."""

    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    chunk_has_fingerprint = True

    def __init__(self, model_name: str, tokenizer, want_logprobs: bool, in_reasoning: bool):
        super().__init__(model_name, tokenizer, want_logprobs)
        self.in_reasoning = in_reasoning  # the prompt opened <think> itself
        self.splitters: list[ReasoningSplitter] = []  # per streamed job

    def choice(self, job: Job) -> dict[str, Any]:
        """``{"index", "message": {"role", "content", "reasoning_content"}, "logprobs", "finish_reason"}``."""
        splitter = ReasoningSplitter(self.in_reasoning)
        splitter.feed(job.text)
        splitter.finish()
        message = {"role": "assistant", "content": splitter.content,
                   "reasoning_content": splitter.reasoning if splitter.saw_reasoning else None}
        return {"index": job.index, "message": message,
                "logprobs": {"content": self._logprob_entries(job, 0)} if self.want_logprobs else None,
                "finish_reason": job.finish_reason}

    def begin_stream(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """Each choice opens with ``{"role": "assistant", "content": ""}``, as OpenAI's streams do."""
        super().begin_stream(jobs)
        self.splitters = [ReasoningSplitter(self.in_reasoning) for _ in jobs]
        return [_delta(job.index, {"role": "assistant", "content": ""}) for job in jobs]

    def stream_choices(self, job: Job, event: TokenEvent) -> list[dict[str, Any]]:
        """The event's reasoning and content (and logprobs), then the finish reason in a choice of its own."""
        splitter = self.splitters[job.index]
        reasoning, content = splitter.feed(event.text)
        if event.finished:
            more_r, more_c = splitter.finish()
            reasoning, content = reasoning + more_r, content + more_c
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        logprobs = None
        if self.want_logprobs and len(job.logprobs) > self.sent_logprobs[job.index]:
            logprobs = {"content": self._logprob_entries(job, self.sent_logprobs[job.index])}
            self.sent_logprobs[job.index] = len(job.logprobs)
        out = [_delta(job.index, delta, None, logprobs)] if delta or logprobs else []
        if event.finished:
            out.append(_delta(job.index, {}, event.finish_reason))
        return out

    def _logprob_entries(self, job: Job, start: int) -> list[dict[str, Any]]:
        out = []
        for t, lp in zip(job.text_tokens[start:], job.logprobs[start:]):
            piece = self.token_text(t)
            out.append({"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8")), "top_logprobs": []})
        return out


def _delta(index: int, delta: dict[str, Any], finish_reason: str | None = None,
           logprobs: Any = None) -> dict[str, Any]:
    """A chat stream choice."""
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
