"""Passkey retrieval: a number hidden in filler text, to be repeated exactly.

The test of long-context retrieval from Mohtashami & Jaggi (Landmark Attention, arXiv 2305.16300,
§4.2) that DeepSeek-V3's context extension is checked with in its needle-in-a-haystack form (V3
report §4.3, Figure 8): a short "needle" line stating a 5-digit pass key sits at a chosen depth of a
haystack of unrelated sentences, and the question at the end asks for the key. The reward is exact
match, so it is a verifiable task like the others, and the only way to score is to attend across the
whole prompt.

Difficulty ``d`` sets the haystack's length: about ``CHARS_PER_LEVEL · d`` characters (tokenizer-free;
:func:`difficulty_for_tokens` picks ``d`` for a length in a given tokenizer's tokens). The depth of the
needle (0 = start, 1 = end of the haystack) is drawn uniformly per problem unless the task is made with
a fixed ``depth``; it is recorded in the problem's fields.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

from .base import Problem, Task, Verdict, is_ascii_digits

__all__ = ["PasskeyTask", "CHARS_PER_LEVEL", "difficulty_for_tokens"]

#: Haystack characters per difficulty level.
CHARS_PER_LEVEL = 64

_SUBJECTS = ("The grass", "The sky", "The sun", "The sea", "The river", "The road", "The hill", "The wind",
             "The field", "The stone", "The cloud", "The forest")
_PREDICATES = ("is green", "is blue", "is warm", "is calm", "runs far", "goes on", "stays still", "turns slowly",
               "is quiet", "is bright", "is wide", "is old")
_QUESTION = "What is the pass key?"


def _needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def _haystack(rng: random.Random, n_chars: int) -> list[str]:
    """Filler sentences (about ``n_chars`` characters in total) drawn from a small grammar."""
    sentences, length = [], 0
    while length < n_chars:
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_PREDICATES)}."
        sentences.append(sentence)
        length += len(sentence) + 1
    return sentences


class PasskeyTask(Task):
    """Repeat the pass key hidden in the haystack (see the module docstring)."""

    name = "passkey"
    description = "repeat a 5-digit pass key hidden at some depth of filler text (long-context retrieval)"
    max_difficulty = 1024  # ~64K characters

    def __init__(self, depth: float | None = None):
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey depth must lie in [0, 1], got {depth!r}")
        self.depth = depth

    def make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        level = min(difficulty, self.max_difficulty)
        key = str(rng.randint(10000, 99999))
        filler = _haystack(rng, CHARS_PER_LEVEL * level)
        depth = rng.random() if self.depth is None else self.depth
        at = round(depth * len(filler))
        text = " ".join(filler[:at] + [_needle(key)] + filler[at:])
        return Problem(prompt=f"{text}\n{_QUESTION}", answer=key,
                       fields={"key": key, "depth": at / len(filler), "haystack_chars": len(text)},
                       solution=f"The line that names the pass key says {key}.")

    def check(self, answer: str, fields: Mapping[str, Any]) -> Verdict:
        text = answer.strip() if isinstance(answer, str) else ""
        if not text or not is_ascii_digits(text):
            return Verdict.MALFORMED
        return Verdict.CORRECT if text == fields["key"] else Verdict.WRONG


def difficulty_for_tokens(n_tokens: int, count_tokens, prompt_fn=lambda p: p.prompt) -> int:
    """The largest difficulty whose prompts (``prompt_fn(problem)``, counted by ``count_tokens(text)``)
    stay within ``n_tokens``, judged on a few sample problems; at least 1."""
    task = PasskeyTask()

    def longest(level: int) -> int:
        return max(count_tokens(prompt_fn(p)) for p in task.generate(seed=0, n=8, difficulty=level))

    level = 1
    while level < task.max_difficulty and longest(level + 1) <= n_tokens:
        level += 1
    return level
