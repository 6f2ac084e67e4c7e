"""Rule-based rewards for RL on verifiable tasks (DeepSeek-R1, arXiv 2501.12948, 2.2.2).

R1-Zero uses no neural reward model: an *accuracy* reward checks the final answer with
a deterministic verifier, and a *format* reward checks that the reasoning sits inside
``<think>`` tags ahead of the answer. A reward here is a plain callable::

    reward(prompt: str, completion: str, fields: dict) -> float | None

where ``fields`` is :attr:`Problem.fields` (it names the task under ``"task"``) and
``None`` means "cannot judge this sample, skip it". A prompt that ends with ``<think>``
(see ``format_prompt(..., prefill_think=True)``) means the completion continues inside
the think block, so the format reward judges ``"<think>" + completion``.

Rewards never evaluate model text as code: answers go through the task verifiers, and
expressions through :mod:`nanoseek.tasks.safe_math`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from .base import THINK_OPEN, RegistryError, Verdict, format_ok
from .registry import get_task

__all__ = [
    "Reward",
    "accuracy_reward",
    "format_reward",
    "combined_reward",
    "graded_reward",
    "countdown_reward",
    "REWARDS",
    "register_reward",
    "get_reward",
    "list_rewards",
]

Reward = Callable[[str, str, Mapping[str, Any]], Optional[float]]


def _with_prefill(prompt: str, completion: str) -> str:
    """Re-attach a ``<think>`` that the prompt pre-filled."""
    if isinstance(prompt, str) and prompt.rstrip().endswith(THINK_OPEN):
        return THINK_OPEN + completion
    return completion


def _verdict(completion: str, fields: Mapping[str, Any]) -> Verdict | None:
    name = fields.get("task") if isinstance(fields, Mapping) else None
    if name is None:
        return None
    return get_task(name).grade(completion, fields)


def accuracy_reward(prompt: str, completion: str, fields: Mapping[str, Any]) -> float | None:
    """1.0 when the last ``<answer>`` verifies for ``fields["task"]``, else 0.0.

    ``None`` when ``fields`` names no task. An unknown task name raises
    :class:`RegistryError` (a configuration error, not a bad sample).
    """
    verdict = _verdict(completion, fields)
    if verdict is None:
        return None
    return 1.0 if verdict is Verdict.CORRECT else 0.0


def format_reward(prompt: str, completion: str, fields: Mapping[str, Any]) -> float:
    """1.0 when the completion is ``<think>...</think> <answer>...</answer>`` and nothing else."""
    return 1.0 if format_ok(_with_prefill(prompt, completion)) else 0.0


def combined_reward(acc_weight: float = 1.0, fmt_weight: float = 0.1) -> Reward:
    """``acc_weight * accuracy + fmt_weight * format``; ``None`` where accuracy is ``None``.

    R1 sums an accuracy and a format reward without publishing weights; the default keeps
    format a small shaping term next to correctness.
    """
    acc_weight, fmt_weight = float(acc_weight), float(fmt_weight)

    def reward(prompt: str, completion: str, fields: Mapping[str, Any]) -> float | None:
        acc = accuracy_reward(prompt, completion, fields)
        if acc is None:
            return None
        return acc_weight * acc + fmt_weight * format_reward(prompt, completion, fields)

    reward.__name__ = f"combined_reward(acc_weight={acc_weight:g}, fmt_weight={fmt_weight:g})"
    return reward


def graded_reward(correct: float = 1.0, wrong: float = 0.1, malformed: float = 0.0,
                  missing: float = 0.0) -> Reward:
    """A reward by :class:`Verdict`: right / well-formed but wrong / unparsable / no answer."""
    scale = {Verdict.CORRECT: float(correct), Verdict.WRONG: float(wrong),
             Verdict.MALFORMED: float(malformed), Verdict.MISSING: float(missing)}

    def reward(prompt: str, completion: str, fields: Mapping[str, Any]) -> float | None:
        verdict = _verdict(completion, fields)
        return None if verdict is None else scale[verdict]

    reward.__name__ = (f"graded_reward(correct={correct:g}, wrong={wrong:g}, "
                       f"malformed={malformed:g}, missing={missing:g})")
    return reward


#: The common Countdown scale: 1.0 right answer, 0.1 a well-formed expression that is
#: wrong (bad value or numbers not allowed), 0.0 no answer or an unparsable one.
countdown_reward: Reward = graded_reward(correct=1.0, wrong=0.1, malformed=0.0, missing=0.0)
countdown_reward.__name__ = "countdown_reward"

#: Registered rewards by name. Prefer :func:`register_reward` to editing it directly.
REWARDS: dict[str, Reward] = {}


def register_reward(name: str, reward: Reward, *, overwrite: bool = False) -> Reward:
    """Register ``reward`` under ``name``; re-registering raises unless ``overwrite``."""
    if not isinstance(name, str) or not name:
        raise ValueError("a reward needs a non-empty string name")
    if not callable(reward):
        raise TypeError(f"reward {name!r} is not callable")
    if name in REWARDS and not overwrite:
        raise ValueError(f"reward {name!r} is already registered (pass overwrite=True)")
    REWARDS[name] = reward
    return reward


def get_reward(name: str) -> Reward:
    """The reward registered as ``name``; raises :class:`RegistryError` listing known names."""
    try:
        return REWARDS[name]
    except (KeyError, TypeError):
        raise RegistryError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}") from None


def list_rewards() -> list[str]:
    return sorted(REWARDS)


register_reward("accuracy", accuracy_reward)
register_reward("format", format_reward)
register_reward("combined", combined_reward())
register_reward("countdown", countdown_reward)
