"""The OpenAI wire protocol of ``nanoseek serve``: request bodies, error bodies, server-sent events.

Request bodies are pydantic models with strict types (a number sent as a string is a 400, not a
coercion); unknown fields are ignored, as OpenAI's server does. Every error is answered as
``{"error": {"message", "type", "param", "code"}}`` (:class:`APIError`); FastAPI's 422 for a body
that does not fit the models becomes one 400 naming the field (:func:`validation_error`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Union

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Number = Annotated[float, Field(strict=True)]  # a JSON number (int or float), never a string
SSE_DONE = "data: [DONE]\n\n"  # the last event of every stream


# ============================================================================ errors
class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's clients expect of an error."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The error as an HTTP response with its status code."""
        return AsciiJSONResponse(self.body(), status_code=self.status)


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: an error message quoting the client's text may hold a lone
    surrogate, which UTF-8 cannot encode (JSONResponse would raise); escaped, it is the same JSON string."""

    def render(self, content: Any) -> bytes:
        """``content`` as compact ASCII JSON."""
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def validation_error(exc: RequestValidationError) -> APIError:
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
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"invalid type for '{where}': {first.get('msg', 'invalid value')}, got "
                         f"{_shown(first.get('input'))}{more}", param=param, code="invalid_type")


def _shown(value: Any) -> str:
    """A client's value as JSON, cut to 80 characters, for an error message."""
    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        shown = repr(value)
    return shown[:77] + "..." if len(shown) > 80 else shown


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ============================================================================ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as OpenAI's server does


class StreamOptions(_Body):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage and no choices."""

    include_usage: StrictBool | None = False


class ContentPart(_Body):
    """One part of a message's content given as a list (only ``{"type": "text"}`` parts are served)."""

    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Body):
    """One message of ``messages``."""

    role: StrictStr
    content: Union[StrictStr, list[ContentPart], None] = None
    name: StrictStr | None = None
    reasoning_content: StrictStr | None = None


class SamplingRequest(_Body):
    """The fields chat and completion requests share: model, sampling, stopping, streaming."""

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


class ChatCompletionRequest(SamplingRequest):
    """The body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None
    tools: Any = None
    functions: Any = None
    response_format: Any = None


class CompletionRequest(SamplingRequest):
    """The body of ``POST /v1/completions``."""

    prompt: Union[StrictStr, list[StrictInt], list[StrictStr], list[list[StrictInt]]]
    logprobs: StrictInt | None = None
    echo: StrictBool | None = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None
