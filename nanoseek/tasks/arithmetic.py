"""Multi-digit integer arithmetic (+, -, *) with column-method worked solutions.

The answer is an integer checked by exact comparison: a rule-based accuracy reward in
the sense of DeepSeek-R1 (arXiv 2501.12948, section 2.2.2). Difficulty ``d`` (1..8) sets
the digits per operand (``d``) and the number of operands (``2 + (d - 1) // 2``);
``d = 1`` uses only + and -. The generator computes the answer itself, with normal
precedence (multiplication first, then left to right), never by evaluating text.
"""

from __future__ import annotations

import random
import re
from typing import Any, Mapping

from .base import Problem, Task, Verdict

__all__ = ["ArithmeticTask", "column_add", "column_sub", "column_mul"]

_INT_RE = re.compile(r"(-?)([0-9]+)")  # ASCII digits only (see nanoseek.tasks.base)
_PLACES = ("ones", "tens", "hundreds", "thousands")


def _place(i: int) -> str:
    return _PLACES[i] if i < len(_PLACES) else f"10^{i}"


def column_add(a: int, b: int) -> str:
    """Column addition of two non-negative integers, one column per clause."""
    assert a >= 0 and b >= 0
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        expr = f"{x}+{y}" + (f"+{carry}" if carry else "")
        carry_text = f" carry {s // 10}" if s >= 10 else ""
        steps.append(f"{_place(i)} {expr}={s} write {s % 10}{carry_text}")
        carry = s // 10
    if carry:
        steps.append(f"write carry {carry}")
    return f"{a} + {b}: " + "; ".join(steps) + f". So {a} + {b} = {a + b}."


def column_sub(a: int, b: int) -> str:
    """Column subtraction with borrowing, for ``a >= b >= 0``."""
    assert a >= b >= 0
    da, db = str(a)[::-1], str(b)[::-1]
    steps, borrow = [], 0
    for i in range(len(da)):
        x = int(da[i]) - borrow
        y = int(db[i]) if i < len(db) else 0
        top = f"{da[i]}-1" if borrow else da[i]
        if x < y:
            steps.append(f"{_place(i)} {top}<{y} so borrow: {x + 10}-{y}={x + 10 - y}")
            borrow = 1
        else:
            steps.append(f"{_place(i)} {top}-{y}={x - y}")
            borrow = 0
    return f"{a} - {b}: " + "; ".join(steps) + f". So {a} - {b} = {a - b}."


def _times_digit(a: int, d: int) -> str:
    digits = str(a)[::-1]
    steps, carry = [], 0
    for i, ch in enumerate(digits):
        p = int(ch) * d + carry
        expr = f"{ch}*{d}" + (f"+{carry}" if carry else "")
        steps.append(f"{expr}={p}")
        carry = p // 10
    return f"{a} * {d}: " + ", ".join(steps) + f" -> {a * d}"


def column_mul(a: int, b: int) -> str:
    """Long multiplication of non-negative integers: one partial product per digit of b."""
    assert a >= 0 and b >= 0
    lines = []
    partials = []
    for i, ch in enumerate(str(b)[::-1]):
        d = int(ch)
        shift = 10**i
        if d == 0:
            lines.append(f"digit {_place(i)} of {b} is 0: partial 0")
            partials.append(0)
            continue
        lines.append(_times_digit(a, d) + (f", shifted: {a * d * shift}" if i else ""))
        partials.append(a * d * shift)
    if len(partials) > 1:
        running = partials[0]
        for p in partials[1:]:
            lines.append(f"{running} + {p} = {running + p}")
            running += p
    lines.append(f"So {a} * {b} = {a * b}.")
    return "\n".join(lines)


def _signed_add(a: int, b: int) -> tuple[str, int]:
    """Worked text for ``a + b`` with signed integers."""
    if a >= 0 and b >= 0:
        return column_add(a, b), a + b
    if a < 0 and b < 0:
        text = f"Both negative: add {-a} and {-b}, then negate.\n" + column_add(-a, -b)
        return text + f" So {a} + ({b}) = {a + b}.", a + b
    big, small = (a, b) if abs(a) >= abs(b) else (b, a)
    text = f"Signs differ: subtract the magnitudes, keep the sign of {big}.\n"
    text += column_sub(abs(big), abs(small))
    return text + f" So {a} + ({b}) = {a + b}.", a + b


def _combine_text(a: int, op: str, b: int) -> tuple[str, int]:
    if op == "*":
        sign_note = ""
        if (a < 0) != (b < 0) and a * b != 0:
            sign_note = f" One factor is negative, so the product is {a * b}."
        return column_mul(abs(a), abs(b)) + sign_note, a * b
    if op == "+":
        return _signed_add(a, b)
    # a - b == a + (-b)
    if a >= b >= 0:
        return column_sub(a, b), a - b
    if 0 <= a < b:
        text = f"{a} - {b} is negative: compute {b} - {a} and negate.\n" + column_sub(b, a)
        return text + f" So {a} - {b} = {a - b}.", a - b
    text, value = _signed_add(a, -b)
    return f"{a} - {b} = {a} + ({-b}).\n" + text, value


def _render(numbers: list[int], ops: list[str]) -> str:
    parts = [str(numbers[0])]
    for op, num in zip(ops, numbers[1:]):
        parts.append(f"{op} {num}")
    return " ".join(parts)


class ArithmeticTask(Task):
    """``What is 4821 + 93 * 57 - 610?`` with an integer answer."""

    name = "arithmetic"
    description = "multi-digit integer arithmetic with + - *"
    max_difficulty = 8

    def make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        d = min(difficulty, self.max_difficulty)
        n_operands = 2 + (d - 1) // 2
        ops_allowed = ["+", "-"] if d == 1 else ["+", "-", "*"]
        max_mults = 1 if d <= 4 else 2
        ops: list[str] = []
        for _ in range(n_operands - 1):
            choices = ops_allowed if ops.count("*") < max_mults else ["+", "-"]
            ops.append(rng.choice(choices))
        numbers = []
        for i in range(n_operands):
            # The right factor of a product gets fewer digits to keep the long
            # multiplication (and the worked solution) a sensible size.
            digits = (d + 1) // 2 if i > 0 and ops[i - 1] == "*" else d
            low = 10 ** (digits - 1) if digits > 1 else 1
            numbers.append(rng.randint(low, 10**digits - 1))

        expression = _render(numbers, ops)
        solution, answer = self._solve(numbers, ops)
        prompt = f"What is {expression}? Give the answer as an integer."
        fields = {"task": self.name, "expression": expression, "answer": answer}
        return Problem(prompt=prompt, answer=str(answer), fields=fields, solution=solution)

    @staticmethod
    def _solve(numbers: list[int], ops: list[str]) -> tuple[str, int]:
        lines = [f"Compute {_render(numbers, ops)}."]
        # Pass 1: products, left to right.
        terms, term_ops = [numbers[0]], []
        if "*" in ops and ("+" in ops or "-" in ops):
            lines.append("Multiplication comes first.")
        for op, num in zip(ops, numbers[1:]):
            if op == "*":
                text, value = _combine_text(terms[-1], "*", num)
                lines.append(text)
                terms[-1] = value
            else:
                terms.append(num)
                term_ops.append(op)
        if "*" in ops and term_ops:
            lines.append(f"Now {_render(terms, term_ops)}.")
        # Pass 2: + and -, left to right.
        value = terms[0]
        for op, num in zip(term_ops, terms[1:]):
            text, value = _combine_text(value, op, num)
            lines.append(text)
        lines.append(f"The answer is {value}.")
        return "\n".join(lines), value

    def check(self, answer: str, fields: Mapping[str, Any]) -> Verdict:
        text = answer.strip() if isinstance(answer, str) else ""
        match = _INT_RE.fullmatch(text)
        if not match:
            return Verdict.MALFORMED
        # Compare canonical decimal strings instead of calling int() on the answer: int() refuses
        # strings of more than sys.get_int_max_str_digits() digits (4300 by default) with a ValueError.
        sign, digits = match.groups()
        digits = digits.lstrip("0") or "0"
        canonical = sign + digits if digits != "0" else "0"
        return Verdict.CORRECT if canonical == str(int(fields["answer"])) else Verdict.WRONG
