"""Verifiable tasks and rule-based rewards for R1-Zero-style RL (arXiv 2501.12948).

    from nanoseek.tasks import get_task, get_reward, format_prompt, format_completion
    task = get_task("countdown")
    problems = task.generate(seed=0, n=100, difficulty=2)
    prompt = format_prompt(problems[0])             # R1-Zero template
    sft_target = format_completion(problems[0])     # <think>solution</think> <answer>..</answer>
    reward = get_reward("countdown")(prompt, completion, problems[0].fields)
"""

from .arithmetic import ArithmeticTask
from .base import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    MAX_ANSWER_CHARS,
    ASCII_DIGITS,
    is_ascii_digits,
    SYSTEM_PROMPT,
    THINK_CLOSE,
    THINK_OPEN,
    Problem,
    RegistryError,
    Task,
    TaskDataError,
    Verdict,
    answer_only,
    answer_only_mix,
    chat_messages,
    format_completion,
    format_ok,
    format_prompt,
    parse_answer,
)
from .countdown import CountdownTask, check_countdown
from .gsm8k import GSM8KTask, load_gsm8k, parse_number
from .linear import LinearTask, parse_linear_answer
from .passkey import PasskeyTask, difficulty_for_tokens
from .registry import TASKS, get_task, list_tasks, register_task
from .rewards import (
    REWARDS,
    Reward,
    accuracy_reward,
    combined_reward,
    countdown_reward,
    format_reward,
    get_reward,
    graded_reward,
    list_rewards,
    register_reward,
)
from .safe_math import MathParseError, ParsedExpression, parse_expression, safe_eval, try_eval

__all__ = [
    "ANSWER_CLOSE", "ANSWER_OPEN", "ASCII_DIGITS", "MAX_ANSWER_CHARS", "THINK_CLOSE", "THINK_OPEN", "is_ascii_digits",
    "Problem", "RegistryError", "Task", "TaskDataError", "Verdict",
    "SYSTEM_PROMPT", "answer_only", "answer_only_mix", "chat_messages", "format_completion", "format_ok",
    "format_prompt", "parse_answer",
    "ArithmeticTask", "CountdownTask", "LinearTask", "GSM8KTask", "PasskeyTask", "difficulty_for_tokens",
    "check_countdown", "load_gsm8k", "parse_number", "parse_linear_answer",
    "TASKS", "get_task", "list_tasks", "register_task",
    "REWARDS", "Reward", "accuracy_reward", "combined_reward", "countdown_reward",
    "format_reward", "get_reward", "graded_reward", "list_rewards", "register_reward",
    "MathParseError", "ParsedExpression", "parse_expression", "safe_eval", "try_eval",
]
