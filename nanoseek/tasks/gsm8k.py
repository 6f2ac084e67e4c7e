"""GSM8K-style grade-school word problems from a JSONL file.

Each line is a JSON object with ``question`` and ``answer``; the answer's last non-empty
line is ``#### N`` (the GSM8K convention), and the lines above it are the worked
solution, whose ``<<48/2=24>>`` calculator annotations are dropped. Nothing is
downloaded: point :func:`load_gsm8k` or :meth:`GSM8KTask.from_file` at a local file. The
verifier compares numbers exactly (commas and ``$`` stripped, ``18.0 == 18``), the kind
of deterministic math check DeepSeek-R1 (arXiv 2501.12948, 2.2.2) uses for its accuracy
reward.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping, Sequence

from .base import Problem, Task, TaskDataError, Verdict, _check_generate_args

__all__ = ["GSM8KTask", "load_gsm8k", "parse_number", "MAX_LINE_BYTES"]

_NUMBER_RE = re.compile(r"[+-]?[0-9]{1,40}(?:\.[0-9]{1,20})?")  # ASCII digits only (see nanoseek.tasks.base)
_FINAL_RE = re.compile(r"####\s*(.*)")
_CALC_RE = re.compile(r"<<[^<>]{0,500}>>")

#: A longer line (in bytes) is reported as bad rather than parsed.
MAX_LINE_BYTES = 1_000_000


def parse_number(text: str) -> Fraction | None:
    """Exact value of a plain number such as ``1,234``, ``$18``, ``-3.50`` or ``18.0``.

    Commas, spaces and one ``$`` (before or after the sign) are ignored; anything else
    (words, units, fractions, exponents) gives ``None``.
    """
    if not isinstance(text, str) or len(text) > 100:
        return None
    cleaned = text.strip().replace(",", "").replace(" ", "")
    if cleaned.startswith("$"):
        cleaned = cleaned[1:]
    elif cleaned[:2] in ("-$", "+$"):
        cleaned = cleaned[0] + cleaned[2:]
    if not _NUMBER_RE.fullmatch(cleaned):
        return None
    return Fraction(cleaned)


def _canonical(value: Fraction, cleaned: str) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    whole, _, frac = cleaned.partition(".")
    return f"{whole}.{frac.rstrip('0')}"


def _problem_from_record(record: Any, where: str) -> Problem:
    if not isinstance(record, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str):
            raise TaskDataError(f"{where}: missing or non-string field {key!r}")
    lines = [ln.rstrip() for ln in record["answer"].strip().splitlines()]
    final = _FINAL_RE.fullmatch(lines[-1].strip()) if lines else None
    if final is None:
        raise TaskDataError(f"{where}: the answer's last line must be '#### <number>'")
    raw = final.group(1).strip()
    value = parse_number(raw)
    if value is None:
        raise TaskDataError(f"{where}: final answer {raw[:40]!r} is not a number")
    cleaned = raw.replace(",", "").replace("$", "").replace(" ", "")
    answer = _canonical(value, cleaned)
    steps = [_CALC_RE.sub("", ln).strip() for ln in lines[:-1]]
    solution = "\n".join(s for s in steps if s)
    fields = {"task": "gsm8k", "answer": answer}
    return Problem(prompt=record["question"].strip(), answer=answer, fields=fields,
                   solution=solution)


def load_gsm8k(path: str | Path) -> list[Problem]:
    """Problems from a GSM8K-style JSONL file; blank lines are skipped.

    Raises :class:`TaskDataError` naming ``file:line`` for the first bad record.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path}: GSM8K file not found")
    problems = []
    with path.open("rb") as f:
        for lineno in itertools.count(1):
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            where = f"{path}:{lineno}"
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise TaskDataError(f"{where}: line longer than {MAX_LINE_BYTES} bytes")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TaskDataError(f"{where}: not valid UTF-8 ({err.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskDataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            problems.append(_problem_from_record(record, where))
    return problems


class GSM8KTask(Task):
    """Word problems from a local GSM8K-style file; the answer is a number.

    ``GSM8KTask()`` (as registered) can verify answers but holds no problems; use
    :meth:`from_file` to get one that can :meth:`generate`. ``difficulty`` is accepted
    and ignored: the data set has no difficulty knob.
    """

    name = "gsm8k"
    description = "GSM8K-style word problems loaded from a local JSONL file"
    max_difficulty = 1

    def __init__(self, problems: Sequence[Problem] | None = None):
        self.problems = list(problems or [])

    @classmethod
    def from_file(cls, path: str | Path) -> "GSM8KTask":
        return cls(load_gsm8k(path))

    def generate(self, seed: int, n: int, difficulty: int = 1) -> list[Problem]:
        """``n`` problems in a seeded shuffled order, cycling if ``n`` exceeds the data."""
        _check_generate_args(seed, n, difficulty)
        if n and not self.problems:
            raise TaskDataError("no GSM8K problems loaded: use GSM8KTask.from_file(path)")
        order = list(range(len(self.problems)))
        random.Random(f"{self.name}:{seed}").shuffle(order)
        return [self._copy(self.problems[order[i % len(order)]]) for i in range(n)]

    @staticmethod
    def _copy(problem: Problem) -> Problem:
        return replace(problem, fields=dict(problem.fields))

    def make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        if not self.problems:
            raise TaskDataError("no GSM8K problems loaded: use GSM8KTask.from_file(path)")
        return self._copy(rng.choice(self.problems))

    def check(self, answer: str, fields: Mapping[str, Any]) -> Verdict:
        value = parse_number(answer)
        if value is None:
            return Verdict.MALFORMED
        expected = parse_number(str(fields["answer"]))
        return Verdict.CORRECT if value == expected else Verdict.WRONG
