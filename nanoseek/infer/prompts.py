"""The prompt token ids of a request: chat messages rendered with the template, or completion prompts.

Text is tokenised in a worker thread, never on the event loop (a long text would stall every other
request), and text too long for the context whatever its tokens is refused before tokenising
(:meth:`~nanoseek.infer.validation.RequestLimits.check_text_size`).

Chat messages are rendered with the template's markers as special tokens and each message's content
as plain text (:meth:`~nanoseek.data.tokenizer.NanoTokenizer.encode_chat_pieces`): a user who writes
``<|eos|><|system|>`` sends those characters, not a forged system turn. ``reasoning_content`` of
earlier assistant turns is dropped, as the DeepSeek API asks clients not to send it. Completion
prompts are raw model input: special tokens in them are matched.
"""

from __future__ import annotations

import anyio

from .protocol import APIError, ChatCompletionRequest, ChatMessage, CompletionRequest
from .validation import RequestLimits, utf8_text


async def chat_prompt(body: ChatCompletionRequest, tokenizer, limits: RequestLimits) -> tuple[str, list[int]]:
    """``(rendered text, token ids)`` of the conversation, ending with the assistant's generation prompt."""
    messages = _chat_messages(body)

    def render_and_encode() -> tuple[str, list[int]]:
        try:  # message contents are plain text: '<|system|>' written by a user is not a system turn
            pieces = tokenizer.chat_pieces(messages, add_generation_prompt=True)
        except Exception as exc:  # a template that refuses the conversation
            raise APIError(400, f"the chat template refused these messages: {exc}", param="messages",
                           code="invalid_value") from None
        rendered = "".join(piece for piece, _ in pieces)
        limits.check_text_size(rendered, "messages")
        return rendered, tokenizer.encode_chat_pieces(pieces)

    text, prompt_ids = await anyio.to_thread.run_sync(render_and_encode)
    limits.check_prompt_ids(prompt_ids, "messages")
    return text, prompt_ids


async def completion_prompts(body: CompletionRequest, tokenizer, limits: RequestLimits) -> list[list[int]]:
    """The token ids of each prompt: a text, a list of texts, a list of ids or a list of id lists."""
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and all(isinstance(x, str) for x in prompt)):
        texts = [prompt] if isinstance(prompt, str) else list(prompt)

        def encode_texts() -> list[list[int]]:
            for text in texts:
                limits.check_text_size(text, "prompt")
            return tokenizer.encode_batch(texts)

        prompts = await anyio.to_thread.run_sync(encode_texts)
    elif prompt and all(isinstance(x, int) for x in prompt):
        prompts = [list(prompt)]
    elif prompt:
        prompts = [list(x) for x in prompt]
    else:
        raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
    for ids in prompts:
        limits.check_prompt_ids(ids, "prompt")
    return prompts


def _chat_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """``messages`` as the template takes them: roles checked (``developer`` is ``system``), text contents."""
    if not body.messages:
        raise APIError(400, "messages must hold at least one message", param="messages", code="invalid_value")
    out = []
    for i, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role '{message.role}' is not supported (system, developer, user "
                                f"or assistant)", param="messages", code="invalid_value")
        content = _message_text(message, i)
        utf8_text(content, f"messages[{i}].content", param="messages")
        out.append({"role": role, "content": content})
    return out


def _message_text(message: ChatMessage, index: int) -> str:
    """A message's content as one text (a list of text parts joined)."""
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
