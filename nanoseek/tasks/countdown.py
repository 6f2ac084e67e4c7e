"""Countdown: reach a target from given numbers with + - * /, each number at most once.

The standard small-scale testbed for R1-Zero-style RL (DeepSeek-R1, arXiv 2501.12948):
the answer is an expression, and the rule-based verifier parses it with the whitelist
evaluator in :mod:`nanoseek.tasks.safe_math`, checks that every number it uses is one of
the given numbers (as a multiset: each at most once) and that its exact value equals the
target. Targets are reachable by construction: the generator builds a random expression
over a subset of the numbers and takes its value as the target. Difficulty sets how many
numbers are given: 3 at difficulty 1, up to 6 at difficulty 4 and above.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping, Union

from .base import Problem, Task, Verdict
from .safe_math import MathParseError, parse_expression

__all__ = ["CountdownTask", "check_countdown"]

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


@dataclass(frozen=True)
class _Op:
    op: str
    left: "_Node"
    right: "_Node"
    value: int


_Node = Union[int, _Op]


def _value(node: _Node) -> int:
    return node if isinstance(node, int) else node.value


def _render(node: _Node) -> str:
    """Infix text with only the parentheses precedence needs."""
    if isinstance(node, int):
        return str(node)
    prec = _PREC[node.op]
    left = _render(node.left)
    if isinstance(node.left, _Op) and _PREC[node.left.op] < prec:
        left = f"({left})"
    right = _render(node.right)
    if isinstance(node.right, _Op):
        rprec = _PREC[node.right.op]
        if rprec < prec or (rprec == prec and node.op in "-/"):
            right = f"({right})"
    return f"{left} {node.op} {right}"


def _combine(rng: random.Random, a: _Node, b: _Node) -> _Op:
    """A random valid step on two nodes: results stay positive integers."""
    x, y = _value(a), _value(b)
    if x < y:
        a, b, x, y = b, a, y, x
    choices = ["+", "*"]
    if x > y:
        choices.append("-")
    if y > 1 and x % y == 0:
        choices.append("/")
    if x * y > 10_000:
        choices.remove("*")
    op = rng.choice(choices)
    value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else 0}[op]
    return _Op(op, a, b, value)


def _random_steps(rng: random.Random, numbers: list[int], n_steps: int) -> list[_Op]:
    """Combine ``n_steps`` times, each time two random items of the pool; return the steps."""
    pool: list[_Node] = list(numbers)
    steps = []
    for _ in range(n_steps):
        i, j = rng.sample(range(len(pool)), 2)
        node = _combine(rng, pool[i], pool[j])
        for k in sorted((i, j), reverse=True):
            pool.pop(k)
        pool.append(node)
        steps.append(node)
    return steps


def _step_text(step: _Op) -> str:
    return f"{_value(step.left)} {step.op} {_value(step.right)} = {step.value}"


def check_countdown(answer: str, numbers: list[int], target: int, use_all: bool = False) -> Verdict:
    """Verdict for a Countdown answer; never raises on bad text.

    Accepts ``expr`` or ``expr = target``. Each number in ``expr`` must come from
    ``numbers`` and be used at most as often as it is given (all of them exactly once
    when ``use_all``); only + - * / and parentheses; exact value must equal ``target``.
    """
    if not isinstance(answer, str):
        return Verdict.MALFORMED
    text = answer.strip()
    claimed = None
    if "=" in text:
        parts = text.split("=")
        if len(parts) != 2:
            return Verdict.MALFORMED
        text, rhs = parts[0], parts[1]
        try:
            claimed = parse_expression(rhs, allow_float=False).value
        except MathParseError:
            return Verdict.MALFORMED
    try:
        parsed = parse_expression(text, allow_float=False)
    except MathParseError:
        return Verdict.MALFORMED
    target_value = Fraction(int(target))
    if claimed is not None and claimed != target_value:
        return Verdict.WRONG
    used = Counter(int(n) for n in parsed.numbers)
    given = Counter(int(n) for n in numbers)
    if used - given:  # a number not given, or used more often than given
        return Verdict.WRONG
    if use_all and used != given:
        return Verdict.WRONG
    return Verdict.CORRECT if parsed.value == target_value else Verdict.WRONG


class CountdownTask(Task):
    """``Using the numbers [44, 19, 35, 7], make 98.`` Answer: an expression."""

    name = "countdown"
    description = "reach a target with + - * / over given numbers, each at most once"
    max_difficulty = 4
    max_target = 999

    def make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        count = min(2 + difficulty, 6)
        for _ in range(1000):
            numbers = [rng.randint(1, 100) for _ in range(count)]
            k = rng.randint(max(2, count - 2), count)
            subset = rng.sample(numbers, k)
            steps = _random_steps(rng, subset, k - 1)
            target = steps[-1].value
            if 1 <= target <= self.max_target and target not in numbers:
                break
        else:  # pragma: no cover - practically unreachable
            raise RuntimeError("countdown generator failed to find a target")
        expression = _render(steps[-1])
        solution = self._trace(rng, numbers, target, steps, expression)
        prompt = (
            f"Using the numbers {numbers}, create an equation that equals {target}. "
            "You can use + - * / and parentheses, and each number at most once. "
            "Give the expression (for example (1 + 2) * 3) as the answer."
        )
        fields = {"task": self.name, "numbers": numbers, "target": target}
        return Problem(prompt=prompt, answer=expression, fields=fields, solution=solution)

    @staticmethod
    def _trace(rng: random.Random, numbers: list[int], target: int, steps: list[_Op],
               expression: str) -> str:
        """A short search trace: zero to two dead ends, then the constructed path."""
        lines = [f"We need {target} from {', '.join(map(str, numbers))}."]
        for _ in range(rng.randint(0, 2)):
            n_steps = rng.randint(1, len(numbers) - 1)
            attempt = _random_steps(rng, numbers, n_steps)
            if any(s.value == target for s in attempt):
                continue  # would not be a dead end
            last = attempt[-1].value
            where = "too high" if last > target else "too low"
            lines.append("Try " + ", then ".join(_step_text(s) for s in attempt)
                         + f". {last} is {where}, not {target}. Back up.")
        lines.append("Try " + ", then ".join(_step_text(s) for s in steps)
                     + f". That is {target}, the target.")
        lines.append(f"So {expression} = {target}.")
        return "\n".join(lines)

    def check(self, answer: str, fields: Mapping[str, Any]) -> Verdict:
        return check_countdown(answer, list(fields["numbers"]), int(fields["target"]),
                               bool(fields.get("use_all", False)))
