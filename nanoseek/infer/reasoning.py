"""Split R1-style output into reasoning and answer, as the DeepSeek API does.

A reasoning model writes ``<think>…</think>`` before its answer. The DeepSeek API (and vLLM's
DeepSeek-R1 reasoning parser) return the text inside the tags as ``reasoning_content`` and the rest
as ``content``; the tags themselves appear in neither. :class:`ReasoningSplitter` does that on a
stream of text deltas, where a tag may arrive cut across deltas (``"<th"`` then ``"ink>"``): text
that could still be the start of a tag is held back until the next delta decides it.

Rules
    * ``<think>`` opens the reasoning only at the very start of the output (leading whitespace
      allowed). When the prompt itself ends with ``<think>`` (templates that force reasoning, as
      DeepSeek-R1's does), start with ``in_reasoning=True``.
    * ``</think>`` closes it; everything after is content. Without ``</think>`` the whole output is
      reasoning (a reply cut by ``max_tokens`` in the middle of its thinking).
    * Whitespace right after ``<think>`` and right after ``</think>``, and right before ``</think>``,
      is dropped, so ``"<think>\\nA\\n</think>\\n\\nB"`` gives reasoning ``"A"`` and content ``"B"``.
    * Output that does not start with ``<think>`` is all content, unchanged.

Streaming and non-streaming agree: :func:`split_reasoning` is the same splitter fed once.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_START, _REASONING, _CONTENT = "start", "reasoning", "content"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningSplitter:
    """Incremental ``<think>`` splitter: :meth:`feed` deltas, then :meth:`finish` once.

    Each call returns ``(reasoning_delta, content_delta)``; either may be empty.
    """

    def __init__(self, in_reasoning: bool = False):
        self._state = _REASONING if in_reasoning else _START
        self._strip = in_reasoning  # drop leading whitespace of the next section
        self._buf = ""
        self.reasoning = ""  # everything released so far
        self.content = ""
        self.saw_reasoning = in_reasoning

    def feed(self, text: str) -> tuple[str, str]:
        """Add a delta of output; ``(reasoning, content)`` released by it (text that may start a tag is held)."""
        self._buf += text
        reasoning, content = [], []
        while True:
            if self._state == _START:
                head = self._buf.lstrip()
                if head.startswith(THINK_OPEN):
                    self._buf = head[len(THINK_OPEN):]
                    self._state, self._strip, self.saw_reasoning = _REASONING, True, True
                    continue
                if not head or THINK_OPEN.startswith(head):
                    break  # still undecided: whitespace or the beginning of "<think>"
                self._state = _CONTENT  # not a reasoning reply: keep the text as it is
                continue
            if self._strip:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._strip = False
            if self._state == _REASONING:
                end = self._buf.find(THINK_CLOSE)
                if end >= 0:
                    reasoning.append(self._buf[:end].rstrip())
                    self._buf = self._buf[end + len(THINK_CLOSE):]
                    self._state, self._strip = _CONTENT, True
                    continue
                # Hold back a possible start of "</think>" and the whitespace before it.
                keep = len(self._buf) - _partial_suffix(self._buf, THINK_CLOSE)
                keep = len(self._buf[:keep].rstrip())
                reasoning.append(self._buf[:keep])
                self._buf = self._buf[keep:]
                break
            content.append(self._buf)
            self._buf = ""
            break
        return self._release("".join(reasoning), "".join(content))

    def finish(self) -> tuple[str, str]:
        """Release what is held back (the output ended): returns the last deltas."""
        buf, self._buf = self._buf, ""
        if self._state == _REASONING:
            return self._release(buf if not self._strip else buf.lstrip(), "")
        if self._state == _CONTENT and self._strip:
            buf = buf.lstrip()
        return self._release("", buf)

    def _release(self, reasoning: str, content: str) -> tuple[str, str]:
        self.reasoning += reasoning
        self.content += content
        return reasoning, content


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """``(reasoning or None, content)`` of a whole output (same rules as the streaming splitter)."""
    splitter = ReasoningSplitter(in_reasoning)
    splitter.feed(text)
    splitter.finish()
    return (splitter.reasoning if splitter.saw_reasoning else None), splitter.content


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """True when a rendered prompt ends inside an open ``<think>`` (the reply starts reasoning)."""
    return prompt_text.rstrip().endswith(THINK_OPEN)
