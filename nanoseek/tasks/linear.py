"""Linear equations in one unknown with an integer solution, solved step by step.

Difficulty 1: ``a x + b = c`` with small positive coefficients; 2: signed and larger;
3 and above: ``a x + b = d x + e`` with coefficients growing with difficulty. The
solution is an integer by construction (pick ``x``, then the constants). The verifier is
a rule-based accuracy check in the sense of DeepSeek-R1 (arXiv 2501.12948, 2.2.2): it
accepts ``x = 3``, ``x=3``, ``3`` or ``-2`` and compares the integer.
"""

from __future__ import annotations

import random
import re
from typing import Any, Mapping

from .base import Problem, Task, Verdict

__all__ = ["LinearTask", "parse_linear_answer"]

_ANSWER_RE = re.compile(r"(?:[xX]\s*=\s*)?([+-]?[0-9]{1,30})")  # ASCII digits only (see nanoseek.tasks.base)


def parse_linear_answer(answer: str) -> int | None:
    """The integer in ``"x = 3"``, ``"3"`` or ``"-2"``; ``None`` for anything else."""
    if not isinstance(answer, str):
        return None
    match = _ANSWER_RE.fullmatch(answer.strip())
    return int(match.group(1)) if match else None


def _x_term(coef: int) -> str:
    if coef == 1:
        return "x"
    if coef == -1:
        return "-x"
    return f"{coef}x"


def _side(coef: int, const: int) -> str:
    """``coef x + const`` as text; either part may be zero (not both)."""
    if coef == 0:
        return str(const)
    if const == 0:
        return _x_term(coef)
    sign = "+" if const > 0 else "-"
    return f"{_x_term(coef)} {sign} {abs(const)}"


def _nonzero(rng: random.Random, low: int, high: int) -> int:
    return rng.randint(low, high) * rng.choice((-1, 1))


class LinearTask(Task):
    """``Solve for x: 7x - 4 = 2x + 11.`` Answer: ``x = 3``."""

    name = "linear"
    description = "solve a linear equation in x with an integer solution"
    max_difficulty = 6

    def make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        d = min(difficulty, self.max_difficulty)
        if d == 1:
            x = rng.randint(0, 10)
            a, b = rng.randint(2, 5), rng.randint(1, 20)
            c_x, e = 0, a * x + b
        else:
            span = 5 * d
            x = rng.randint(-span, span)
            a, b = _nonzero(rng, 2, 3 * d), _nonzero(rng, 1, 10 * d)
            c_x = 0
            if d >= 3:
                c_x = _nonzero(rng, 1, 3 * d)
                while c_x == a:
                    c_x = _nonzero(rng, 1, 3 * d)
            e = (a - c_x) * x + b
        equation = f"{_side(a, b)} = {_side(c_x, e)}"
        solution = self._solve(a, b, c_x, e, x)
        prompt = f"Solve for x: {equation}. Give the answer as x = <integer>."
        fields = {"task": self.name, "equation": equation, "x": x}
        return Problem(prompt=prompt, answer=f"x = {x}", fields=fields, solution=solution)

    @staticmethod
    def _solve(a: int, b: int, c_x: int, e: int, x: int) -> str:
        lines = [f"{_side(a, b)} = {_side(c_x, e)}"]
        coef = a
        if c_x:
            verb = "Subtract" if c_x > 0 else "Add"
            coef = a - c_x
            lines.append(f"{verb} {_x_term(abs(c_x))} {'from' if c_x > 0 else 'to'} both sides: "
                         f"{_side(coef, b)} = {e}")
        rhs = e
        if b:
            verb, prep = ("Subtract", "from") if b > 0 else ("Add", "to")
            rhs = e - b
            lines.append(f"{verb} {abs(b)} {prep} both sides: {_x_term(coef)} = {rhs}")
        if coef != 1:
            lines.append(f"Divide both sides by {coef}: x = {rhs} / {coef} = {x}")
        lines.append(f"Check: at x = {x} the left side is {a * x + b} "
                     f"and the right side is {c_x * x + e}.")
        lines.append(f"So x = {x}.")
        return "\n".join(lines)

    def check(self, answer: str, fields: Mapping[str, Any]) -> Verdict:
        value = parse_linear_answer(answer)
        if value is None:
            return Verdict.MALFORMED
        return Verdict.CORRECT if value == int(fields["x"]) else Verdict.WRONG
