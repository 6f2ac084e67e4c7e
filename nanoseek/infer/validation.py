"""What the server accepts of a request: sampling values, stop strings, seeds, prompt sizes.

Every refusal is an :class:`~nanoseek.infer.protocol.APIError` 400 naming the parameter and the
value. Unsupported OpenAI parameters (penalties, ``logit_bias``, ``echo``, ``best_of``, ``suffix``,
tools, JSON modes, top alternatives of logprobs) are refused rather than silently ignored.
"""

from __future__ import annotations

import json
import math

from .protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingRequest
from .sampling import SamplingParams

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 128  # characters per stop string: the engine checks every stop string at every token
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


class RequestLimits:
    """The checks that depend on the served model: context length, vocabulary, longest token."""

    def __init__(self, max_seq_len: int, vocab_size: int, max_token_bytes: int | None):
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.max_token_bytes = max_token_bytes

    def sampling_params(self, body: SamplingRequest, prompt_lens: list[int], max_tokens: int | None,
                        max_tokens_name: str, prompt_name: str, logprobs: bool) -> list[list[SamplingParams]]:
        """Per prompt, the SamplingParams of each of its ``n`` choices (400 on any bad value)."""
        n = 1 if body.n is None else body.n
        if not 1 <= n <= MAX_N:
            raise APIError(400, f"n must be between 1 and {MAX_N}, got {n}", param="n", code="invalid_value")
        _check_seed(body.seed, n)
        _refuse_penalties(body)
        temperature, top_p, top_k = _sampling_knobs(body)
        stop = _stop_strings(body.stop)
        stop_ids = list(body.stop_token_ids or [])
        if any(not 0 <= t < self.vocab_size for t in stop_ids):
            raise APIError(400, f"stop_token_ids must lie in [0, {self.vocab_size})", param="stop_token_ids",
                           code="invalid_value")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"{max_tokens_name} must be at least 1, got {max_tokens}",
                           param=max_tokens_name, code="invalid_value")
        out = []
        for plen in prompt_lens:
            want = self._completion_budget(plen, max_tokens, max_tokens_name, prompt_name)
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

    def _completion_budget(self, plen: int, max_tokens: int | None, max_tokens_name: str, prompt_name: str) -> int:
        """The tokens a prompt of ``plen`` tokens may generate: ``max_tokens``, or the rest of the context."""
        limit = self.max_seq_len
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
        return want

    def check_text_size(self, text: str, name: str) -> None:
        """400 for text that is not Unicode (a lone surrogate, which JSON can carry), or that cannot fit the
        context whatever its tokens, told without tokenising it."""
        size = len(utf8_text(text, name))
        if self.max_token_bytes is None:
            return
        least = -(-size // self.max_token_bytes)
        if least >= self.max_seq_len:
            raise APIError(400, f"This model's maximum context length is {self.max_seq_len} tokens, but the text "
                                f"of the {name} is {size} bytes, at least {least} tokens (no token is longer than "
                                f"{self.max_token_bytes} bytes). Please shorten the {name}.",
                           param=name, code="context_length_exceeded")

    def check_prompt_ids(self, ids: list[int], name: str) -> None:
        """400 for an empty prompt or a token id outside the vocabulary."""
        if not ids:
            raise APIError(400, f"the {name} is empty: give at least one token", param=name, code="invalid_value")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} in the {name} is outside the vocabulary [0, {self.vocab_size})",
                           param=name, code="invalid_value")


def _check_seed(seed: int | None, n: int) -> None:
    """The ``n`` choices use seeds ``seed`` … ``seed + n - 1``: all must be seeds torch takes."""
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX - (n - 1):
        choices = f" (the {n} choices use seeds seed to seed+{n - 1})" if n > 1 else ""
        raise APIError(400, f"seed must be an integer from {SEED_MIN} to {SEED_MAX - (n - 1)}{choices}, got "
                            f"{seed}", param="seed", code="invalid_value")


def _refuse_penalties(body: SamplingRequest) -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(body, name)
        if value not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported by this server (got {value}); leave it at 0",
                           param=name, code="unsupported_parameter")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias",
                       code="unsupported_parameter")


def _sampling_knobs(body: SamplingRequest) -> tuple[float, float, int]:
    """``(temperature, top_p, top_k)`` with their defaults (1, 1, off), each checked."""
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
    return temperature, top_p, top_k


def _stop_strings(given: str | list[str] | None) -> list[str]:
    """``stop`` as a list: at most MAX_STOP non-empty Unicode strings of at most MAX_STOP_CHARS each."""
    stop = [given] if isinstance(given, str) else list(given or [])
    if len(stop) > MAX_STOP or not all(stop):
        raise APIError(400, f"stop must be at most {MAX_STOP} non-empty strings", param="stop",
                       code="invalid_value")

    def where(i: int) -> str:
        return "stop" if isinstance(given, str) else f"stop[{i}]"

    for i, text in enumerate(stop):
        utf8_text(text, where(i), param="stop")
    longest = max(range(len(stop)), key=lambda i: len(stop[i]), default=None)
    if longest is not None and len(stop[longest]) > MAX_STOP_CHARS:
        raise APIError(400, f"stop strings must be at most {MAX_STOP_CHARS} characters long; {where(longest)} has "
                            f"{len(stop[longest])}", param="stop", code="invalid_value")
    return stop


def check_chat_request(body: ChatCompletionRequest) -> None:
    """400 for the chat parameters this server does not serve (tools, JSON modes, top alternatives)."""
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


def check_completion_request(body: CompletionRequest) -> None:
    """400 for the completion parameters this server does not serve (echo, best_of, suffix, top alternatives)."""
    for name, bad in (("echo", bool(body.echo)), ("best_of", body.best_of not in (None, 1)),
                      ("suffix", bool(body.suffix))):
        if bad:
            raise APIError(400, f"{name} is not supported by this server", param=name,
                           code="unsupported_parameter")
    if body.logprobs not in (None, 0):
        raise APIError(400, f"logprobs={body.logprobs} asks for top alternatives, which this server does not "
                            "compute; use logprobs=0 for the sampled tokens' log-probabilities",
                       param="logprobs", code="unsupported_parameter")


def utf8_text(text: str, name: str, param: str | None = None) -> bytes:
    """``text`` in UTF-8; a 400 naming ``name`` when it holds a lone surrogate (``"\\ud800"`` in JSON)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{name} is not valid Unicode text: it holds the lone surrogate "
                            f"\\u{ord(text[exc.start]):04x} at character {exc.start}", param=param or name,
                       code="invalid_value") from None


def max_token_bytes(tokenizer) -> int | None:
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
