"""The endpoints of ``nanoseek serve`` and the handlers that turn every error into OpenAI's error shape.

The two generation endpoints differ only in how the prompt is built (:mod:`nanoseek.infer.prompts`)
and how the answer is shaped (:mod:`nanoseek.infer.replies`); :func:`~nanoseek.infer.responder.respond`
runs both.
"""

from __future__ import annotations

import logging
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .gate import endpoint_label
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error
from .prompts import chat_prompt, completion_prompts
from .reasoning import prompt_opens_reasoning
from .replies import ChatReply, CompletionReply
from .responder import respond
from .state import ServerState
from .validation import check_chat_request, check_completion_request

log = logging.getLogger("nanoseek.server")


def add_error_handlers(app: FastAPI, server: ServerState) -> None:
    """Answer APIError, FastAPI's 422, Starlette's 404/405 and any crash as ``{"error": {...}}``."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

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
        server.metrics.count_request(endpoint_label(request.url.path), 500)  # sent outside the counting gate
        return APIError(500, f"internal server error: {type(exc).__name__}", type="server_error").response()


def add_info_routes(app: FastAPI, server: ServerState) -> None:
    """``/v1/models``, ``/v1/models/{id}``, ``/health``, ``/metrics`` and the chat page ``/``."""

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        server.check_model(model_id)
        return server.model_card()

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


def add_generation_routes(app: FastAPI, server: ServerState) -> None:
    """``POST /v1/completions`` and ``POST /v1/chat/completions``."""
    tokenizer, limits = server.tokenizer, server.limits

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        check_completion_request(body)
        prompts = await completion_prompts(body, tokenizer, limits)
        reply = CompletionReply(server.model_name, tokenizer, want_logprobs=body.logprobs is not None)
        params = limits.sampling_params(body, [len(p) for p in prompts], body.max_tokens, "max_tokens", "prompt",
                                        reply.want_logprobs)
        return await respond(request, body, reply, server.admission, prompts, params)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        server.check_model(body.model)
        check_chat_request(body)
        text, prompt_ids = await chat_prompt(body, tokenizer, limits)
        max_tokens, name = body.max_tokens, "max_tokens"
        if body.max_completion_tokens is not None:
            max_tokens, name = body.max_completion_tokens, "max_completion_tokens"
        reply = ChatReply(server.model_name, tokenizer, want_logprobs=bool(body.logprobs),
                          in_reasoning=prompt_opens_reasoning(text))
        params = limits.sampling_params(body, [len(prompt_ids)], max_tokens, name, "messages", reply.want_logprobs)
        return await respond(request, body, reply, server.admission, [prompt_ids], params)


def _html_escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
            .replace("'", "&#39;"))
