"""A bounded, whitelist-only arithmetic evaluator for verifying model answers.

Rule-based rewards (DeepSeek-R1, arXiv 2501.12948, section 2.2.2) must check answers
that a model under RL wrote, so the checker sees adversarial text by construction: a
policy that finds a way to crash or stall the reward will be pushed toward it. This
module therefore never hands the text to Python's evaluator. It:

1. rejects anything longer than ``max_chars`` before doing any other work;
2. rejects any character outside digits, whitespace, ``+ - * / ( ) .`` (after mapping
   ``×``, ``÷`` and the Unicode minus to their ASCII forms), so names, calls, strings,
   attributes and lambdas never reach the parser;
3. parses with ``ast.parse(mode="eval")`` and walks the tree over a whitelist of node
   types: ``Expression``, ``BinOp`` with ``Add``/``Sub``/``Mult``/``Div``, ``UnaryOp``
   with ``USub``/``UAdd`` and numeric ``Constant`` leaves. ``Pow`` is not allowed, so
   ``9**9**9**9`` is rejected without computing anything;
4. bounds the node count, the nesting depth and the magnitude of every constant and
   every intermediate value (numerator and denominator), so the exact
   :class:`fractions.Fraction` arithmetic stays small.

Length and depth are separate limits. ``max_chars`` and ``max_nodes`` bound how long an
expression is (a flat sum of up to 64 terms fits the default 128 nodes); ``max_depth`` bounds
how deeply it nests: a parenthesised right operand or a sign opens a level, a chain of
operators evaluated left to right does not. ``ast.parse`` turns the flat sum ``1 + 2 + ... +
60`` into a tree 60 levels deep along its left operands; the walker folds such a chain in a
loop, so the sum is one level deep and evaluates without recursion, while ``1 + (2 + (3 +
...))`` or ``- - - 1`` nest one level per operator and are refused past ``max_depth``.

Every failure raises :class:`MathParseError`; nothing else escapes for string input.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "MathParseError",
    "ParsedExpression",
    "parse_expression",
    "safe_eval",
    "try_eval",
    "MAX_CHARS",
    "MAX_NODES",
    "MAX_DEPTH",
    "MAX_ABS",
]

MAX_CHARS = 200
MAX_NODES = 128
MAX_DEPTH = 40
MAX_ABS = 10**12

_ALLOWED_CHARS = frozenset("0123456789+-*/(). \t\n\r")
_UNICODE_OPS = {"\u00d7": "*", "\u00f7": "/", "\u2212": "-", "\u2013": "-"}


class MathParseError(ValueError):
    """The text is not an allowed arithmetic expression, or it breaks a limit."""


@dataclass(frozen=True)
class ParsedExpression:
    """The exact value of an expression and the numbers written in it (its leaves).

    ``numbers`` holds every numeric literal in source order, without signs: ``-3 + 4``
    has numbers ``(3, 4)``. Countdown uses it to check that each given number is used at
    most once.
    """

    value: Fraction
    numbers: tuple[Fraction, ...]


class _Walker:
    def __init__(self, max_nodes: int, max_depth: int, max_abs: int, allow_float: bool):
        self.max_nodes = max_nodes
        self.max_depth = max_depth
        self.max_abs = max_abs
        self.allow_float = allow_float
        self.nodes = 0
        self.numbers: list[Fraction] = []

    def _bounded(self, value: Fraction) -> Fraction:
        if abs(value.numerator) > self.max_abs * value.denominator:
            raise MathParseError(f"intermediate value exceeds {self.max_abs:g} in magnitude")
        if value.denominator > self.max_abs:
            raise MathParseError("intermediate fraction has too large a denominator")
        return value

    def _count(self, depth: int) -> None:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise MathParseError(f"expression has more than {self.max_nodes} nodes")
        if depth > self.max_depth:
            raise MathParseError(f"expression nests deeper than {self.max_depth}")

    def walk(self, node: ast.AST, depth: int) -> Fraction:
        self._count(depth)
        if isinstance(node, ast.BinOp):
            # A left-to-right chain (a + b - c * d ...) is a left-leaning tree as deep as it is
            # long: walk down its left operands in a loop, all at this depth, then fold upwards.
            chain = [node]
            while True:
                if not isinstance(chain[-1].op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
                    raise MathParseError(f"operator {type(chain[-1].op).__name__} is not allowed")
                if not isinstance(chain[-1].left, ast.BinOp):
                    break
                chain.append(chain[-1].left)
                self._count(depth)
            value = self.walk(chain[-1].left, depth + 1)
            for link in reversed(chain):
                value = self._binop(link.op, value, self.walk(link.right, depth + 1))
            return value
        if isinstance(node, ast.Constant):
            return self._constant(node.value)
        if isinstance(node, ast.UnaryOp):
            operand = self.walk(node.operand, depth + 1)
            if isinstance(node.op, ast.USub):
                return -operand
            if isinstance(node.op, ast.UAdd):
                return operand
            raise MathParseError(f"unary operator {type(node.op).__name__} is not allowed")
        raise MathParseError(f"{type(node).__name__} is not allowed in an arithmetic expression")

    def _binop(self, op: ast.operator, left: Fraction, right: Fraction) -> Fraction:
        if isinstance(op, ast.Add):
            result = left + right
        elif isinstance(op, ast.Sub):
            result = left - right
        elif isinstance(op, ast.Mult):
            result = left * right
        elif isinstance(op, ast.Div):
            if right == 0:
                raise MathParseError("division by zero")
            result = left / right
        else:
            raise MathParseError(f"operator {type(op).__name__} is not allowed")
        return self._bounded(result)

    def _constant(self, value: object) -> Fraction:
        # bool is a subclass of int: reject it explicitly (it cannot pass the character
        # filter anyway, but the walker should stand on its own).
        if isinstance(value, bool):
            raise MathParseError("booleans are not numbers here")
        if isinstance(value, int):
            number = Fraction(value)
        elif isinstance(value, float):
            if not self.allow_float:
                raise MathParseError("only integers are allowed")
            if not math.isfinite(value):
                raise MathParseError("non-finite number")
            # repr() gives the shortest decimal that round-trips, so 0.1 becomes 1/10
            # rather than the binary approximation Fraction(0.1) would give.
            number = Fraction(repr(value))
        else:
            raise MathParseError(f"constant of type {type(value).__name__} is not allowed")
        if abs(number) > self.max_abs:
            raise MathParseError(f"number exceeds {self.max_abs:g} in magnitude")
        self.numbers.append(number)
        return number


def _clean(text: object, max_chars: int) -> str:
    if not isinstance(text, str):
        raise MathParseError(f"expected a string, got {type(text).__name__}")
    # Length first: nothing below may run on a huge input.
    if len(text) > max_chars:
        raise MathParseError(f"expression longer than {max_chars} characters")
    for uni, ascii_op in _UNICODE_OPS.items():
        text = text.replace(uni, ascii_op)
    bad = set(text) - _ALLOWED_CHARS
    if bad:
        shown = "".join(sorted(bad))[:10]
        raise MathParseError(f"characters not allowed in an arithmetic expression: {shown!r}")
    text = " ".join(text.split())
    if not text:
        raise MathParseError("empty expression")
    return text


def parse_expression(
    text: str,
    *,
    max_chars: int = MAX_CHARS,
    max_nodes: int = MAX_NODES,
    max_depth: int = MAX_DEPTH,
    max_abs: int = MAX_ABS,
    allow_float: bool = True,
) -> ParsedExpression:
    """Parse and evaluate ``text`` exactly; return its value and the numbers it uses.

    Raises :class:`MathParseError` for anything that is not a plain arithmetic
    expression over ``+ - * /`` and parentheses, or that breaks one of the limits.
    """
    cleaned = _clean(text, max_chars)
    try:
        tree = ast.parse(cleaned, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as err:
        raise MathParseError(f"not a valid expression: {type(err).__name__}") from None
    if not isinstance(tree, ast.Expression):  # pragma: no cover - mode="eval" guarantees it
        raise MathParseError("not an expression")
    walker = _Walker(max_nodes, max_depth, max_abs, allow_float)
    try:
        value = walker.walk(tree.body, depth=1)
    except RecursionError:
        raise MathParseError("expression nests too deeply") from None
    return ParsedExpression(value=value, numbers=tuple(walker.numbers))


def safe_eval(text: str, **limits) -> Fraction:
    """Exact value of an arithmetic expression; raises :class:`MathParseError` if invalid."""
    return parse_expression(text, **limits).value


def try_eval(text: str, **limits) -> Fraction | None:
    """Like :func:`safe_eval` but returns ``None`` for an invalid expression."""
    try:
        return parse_expression(text, **limits).value
    except MathParseError:
        return None
