"""Problems, the Task base class and the R1-Zero prompt/completion format.

DeepSeek-R1-Zero (arXiv 2501.12948, section 2.2) trains a base model with RL only,
against rule-based rewards: an *accuracy* reward that checks the final answer with a
deterministic verifier, and a *format* reward that asks the model to put its reasoning
between ``<think>`` and ``</think>``. Its training template (Table 1 of the paper) tells
the model to reason first and then answer, with the reasoning and the answer enclosed in
``<think> </think>`` and ``<answer> </answer>`` tags. This module holds that template, the
answer extraction and the format check; each task family supplies problems and a
verifier. The worked ``solution`` of a problem serves as cold-start SFT data, the small
set of long chain-of-thought examples R1 (section 2.3.1) uses before RL.

Digits: every verifier reads numbers written with the ASCII digits ``0``-``9`` only, and
judges an answer with any other digit (Arabic-Indic ``٣``, full-width ``３``, Devanagari
``३``, superscript ``³``, ...) ``MALFORMED``. Python accepts those silently in ``\\d``,
``str.isdigit``, ``int()``, ``float()`` and ``Fraction()``, so each verifier matches
``[0-9]`` explicitly (:func:`is_ascii_digits`) rather than relying on them. One rule for
every task, and this one rather than normalising: the problems, their answers and the
cold-start data are ASCII, so a policy that answers in another script has drifted from
what it was taught, not found another spelling of the answer; a rule-based reward should
pay for the one form it asks for (R1's rewards check a fixed format), and a mapping table
is one more thing a policy under RL could probe. Countdown's expression parser
(:mod:`nanoseek.tasks.safe_math`) already whitelists ASCII characters.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any, Mapping

from ..errors import ConfigError, NanoseekError

__all__ = [
    "Problem",
    "Task",
    "TaskDataError",
    "RegistryError",
    "Verdict",
    "format_prompt",
    "format_completion",
    "answer_only",
    "answer_only_mix",
    "chat_messages",
    "SYSTEM_PROMPT",
    "parse_answer",
    "format_ok",
    "MAX_ANSWER_CHARS",
    "ASCII_DIGITS",
    "is_ascii_digits",
    "THINK_OPEN",
    "THINK_CLOSE",
    "ANSWER_OPEN",
    "ANSWER_CLOSE",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

#: Longest answer (between the tags) that :func:`parse_answer` will return.
MAX_ANSWER_CHARS = 1000

#: The only digits a verifier reads (see "Digits" in the module docstring).
ASCII_DIGITS = "0123456789"


def is_ascii_digits(text: str) -> bool:
    """True when ``text`` is one or more ASCII digits ``0``-``9`` and nothing else. Unlike
    ``str.isdigit`` it refuses other scripts' digits and superscripts (``"³".isdigit()`` is True
    and ``int("³")`` raises)."""
    return isinstance(text, str) and bool(text) and all(c in ASCII_DIGITS for c in text)


class TaskDataError(NanoseekError, ValueError):
    """A task data file is missing or holds a bad record (the message names file:line)."""


class RegistryError(NanoseekError, KeyError):
    """An unknown task or reward name (the message lists the known ones)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Verdict(str, Enum):
    """How an answer fared against a verifier.

    ``MISSING``: no ``<answer>`` found; ``MALFORMED``: an answer that does not parse in the
    task's answer syntax; ``WRONG``: well formed but incorrect; ``CORRECT``.
    """

    CORRECT = "correct"
    WRONG = "wrong"
    MALFORMED = "malformed"
    MISSING = "missing"


@dataclass
class Problem:
    """One verifiable problem.

    ``prompt`` is the user question alone (wrap it with :func:`format_prompt`); ``answer``
    is the canonical answer string; ``fields`` is everything the verifier needs (always
    JSON-serialisable and always holding ``"task"``, the task name the reward dispatches
    on); ``solution`` is a worked, step-by-step solution written by the generator's own
    solver, used for cold-start SFT through :func:`format_completion`.
    """

    prompt: str
    answer: str
    fields: dict[str, Any] = field(default_factory=dict)
    solution: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Problem":
        return cls(
            prompt=str(data["prompt"]),
            answer=str(data["answer"]),
            fields=dict(data.get("fields", {})),
            solution=str(data.get("solution", "")),
        )


_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question and the "
    "Assistant solves it. The Assistant first thinks through the reasoning process and "
    "then gives the User the answer. The reasoning goes inside <think> </think> tags and "
    "the final answer inside <answer> </answer> tags, like this: "
    "<think> reasoning here </think> <answer> answer here </answer>.\n"
    "User: {question}\n"
    "Assistant:"
)


def format_prompt(problem: Problem | str, *, prefill_think: bool = False) -> str:
    """Wrap a problem in the R1-Zero template (R1 paper, Table 1).

    With ``prefill_think=True`` the prompt ends with ``" <think>"`` so generation starts
    inside the reasoning block; the rewards in :mod:`nanoseek.tasks.rewards` notice a
    prompt that ends with ``<think>`` and judge ``"<think>" + completion``.
    """
    question = problem.prompt if isinstance(problem, Problem) else str(problem)
    text = _TEMPLATE.format(question=question.strip())
    return text + " " + THINK_OPEN if prefill_think else text


#: The R1 instruction as a system turn, for chat-formatted models (SFT, GRPO, eval, serving).
#: How problems are put to a model: in its chat template (``nanoseek.tasks.evaluate.chat_prompt``) or as a
#: base model's document prefix (``base_prompt`` there; R1-Zero's RL straight from the base model).
PROMPT_FORMATS = ("chat", "base")

SYSTEM_PROMPT = "Reason inside <think> </think>, then give the final answer inside <answer> </answer>."


def chat_messages(problem: Problem | str, *, with_completion: bool = False) -> list[dict[str, str]]:
    """The problem as chat messages (system instruction + user question), the form that SFT, GRPO,
    evaluation and the server share; ``with_completion`` appends the ideal assistant turn (SFT)."""
    question = problem.prompt if isinstance(problem, Problem) else str(problem)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question.strip()}]
    if with_completion:
        if not isinstance(problem, Problem):
            raise TypeError("with_completion needs a Problem (it holds the solution)")
        messages.append({"role": "assistant", "content": format_completion(problem)})
    return messages


def format_completion(problem: Problem) -> str:
    """The ideal completion for SFT: ``<think>{solution}</think> <answer>{answer}</answer>``."""
    return f"{THINK_OPEN}{problem.solution}{THINK_CLOSE} {ANSWER_OPEN}{problem.answer}{ANSWER_CLOSE}"


def answer_only(problem: Problem) -> Problem:
    """``problem`` with its worked solution cut to the bare result, ``"The answer is N."``: how much text
    states an answer without the working. A small model that learns from such text learns to answer in
    one step, and is often wrong where the worked form would be right."""
    return replace(problem, solution=f"The answer is {problem.answer}.")


def answer_only_mix(problems: list[Problem], fraction: float, seed: int) -> list[Problem]:
    """``problems`` with a seeded ``fraction`` of them (each independently) made :func:`answer_only`."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"answer_only_fraction must lie in [0, 1], got {fraction!r}")
    rng = random.Random(f"answer-only:{seed}")
    return [answer_only(p) if rng.random() < fraction else p for p in problems]


def parse_answer(completion: str, *, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """Content of the LAST ``<answer>...</answer>`` in ``completion``, stripped.

    Returns ``None`` when there is no closed answer block or when its content is longer
    than ``max_chars`` (so a verifier never sees a huge string). Uses ``str.rfind`` only:
    linear time however the tags are arranged.
    """
    if not isinstance(completion, str):
        return None
    end = completion.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = completion.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    start += len(ANSWER_OPEN)
    if end - start > max_chars + 64:  # cheap bound before copying; whitespace slack
        return None
    content = completion[start:end].strip()
    if len(content) > max_chars:
        return None
    return content


def format_ok(completion: str) -> bool:
    """R1-Zero format check: ``<think>...</think>`` then ``<answer>...</answer>``, nothing else.

    The completion must start (after whitespace) with the one think block, followed after
    optional whitespace by the one answer block, with only whitespace after it. Each tag
    appears exactly once, and the answer is not empty.
    """
    if not isinstance(completion, str):
        return False
    text = completion.strip()
    if not text.startswith(THINK_OPEN) or not text.endswith(ANSWER_CLOSE):
        return False
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    think_close = text.index(THINK_CLOSE)
    answer_open = text.index(ANSWER_OPEN)
    if answer_open < think_close:
        return False
    if text[think_close + len(THINK_CLOSE):answer_open].strip():
        return False
    answer = text[answer_open + len(ANSWER_OPEN):-len(ANSWER_CLOSE)]
    return bool(answer.strip())


class Task(ABC):
    """A family of verifiable problems.

    Subclasses set ``name`` and implement :meth:`make_problem` (one problem from a
    seeded ``random.Random``) and :meth:`check` (verify an answer string). Problem ``i``
    of ``generate(seed, n, difficulty)`` comes from its own ``random.Random`` seeded by
    (task name, seed, difficulty, i), so generation is deterministic per seed, does not
    depend on ``PYTHONHASHSEED``, and ``generate(seed, 5)`` is a prefix of
    ``generate(seed, 10)``.
    """

    name: str = ""
    description: str = ""
    #: Largest meaningful difficulty; larger values are clamped by the task.
    max_difficulty: int = 8

    def generate(self, seed: int, n: int, difficulty: int = 1) -> list[Problem]:
        """``n`` problems at ``difficulty`` (>= 1), deterministic for a given ``seed``."""
        _check_generate_args(seed, n, difficulty)
        problems = []
        for i in range(n):
            rng = random.Random(f"{self.name}:{seed}:{difficulty}:{i}")
            problem = self.make_problem(rng, difficulty)
            problem.fields.setdefault("task", self.name)
            problems.append(problem)
        return problems

    @abstractmethod
    def make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        """One problem drawn with ``rng`` (its only source of randomness)."""

    @abstractmethod
    def check(self, answer: str, fields: Mapping[str, Any]) -> Verdict:
        """Judge an extracted answer string against ``fields``; never raise on bad text."""

    def verify(self, answer: str | None, fields: Mapping[str, Any]) -> bool:
        """True when ``answer`` (already extracted from the tags) is correct."""
        if answer is None:
            return False
        return self.check(answer, fields) is Verdict.CORRECT

    def grade(self, completion: str, fields: Mapping[str, Any]) -> Verdict:
        """Extract the last ``<answer>`` from a completion and judge it."""
        answer = parse_answer(completion)
        if answer is None:
            return Verdict.MISSING
        return self.check(answer, fields)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _check_generate_args(seed: int, n: int, difficulty: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(difficulty, int) or isinstance(difficulty, bool) or difficulty < 1:
        raise ValueError(f"difficulty must be an int >= 1, got {difficulty!r}")


def parse_task_spec(spec: str, flag: str = "--cold-start") -> tuple[str, int | None]:
    """``"countdown:3"`` → ``("countdown", 3)``; ``"countdown"`` → ``("countdown", None)``."""
    name, sep, diff = str(spec).partition(":")
    if not name:
        raise ConfigError(f"{flag} {spec!r}: expected TASK or TASK:DIFFICULTY")
    if not sep:
        return name, None
    if not is_ascii_digits(diff.strip()) or int(diff) < 1:
        raise ConfigError(f"{flag} {spec!r}: the difficulty after ':' must be a positive integer")
    return name, int(diff)
