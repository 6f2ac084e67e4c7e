"""Cold-start SFT data (R1 §2.3.1): chat examples from the tasks' own solver-written worked solutions.

Each example is :func:`~nanoseek.tasks.base.chat_messages` ``(problem, with_completion=True)``: the R1
instruction as a system turn, the question as the user turn and the ideal assistant turn
``<think>{solution}</think> <answer>{answer}</answer>``. Problems come from seeds below
:data:`~nanoseek.tasks.evaluate.EVAL_SEED_BASE`, so evaluation never sees them.

    records = make_cold_start(["arithmetic:2", "countdown"], n=2000, seed=0)
    write_jsonl(records, "cold_start.jsonl")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError, NanoseekError
from .base import answer_only_mix, chat_messages, parse_task_spec
from .evaluate import EVAL_SEED_BASE
from .registry import get_task

DEFAULT_DIFFICULTY = 1


def _specs(task_names: Sequence[str], difficulties) -> list[tuple[str, int]]:
    if isinstance(task_names, str):
        task_names = [task_names]
    if not task_names:
        raise ConfigError("cold start: give at least one task")
    if difficulties is None or isinstance(difficulties, int):
        difficulties = [difficulties] * len(task_names)
    difficulties = list(difficulties)
    if len(difficulties) != len(task_names):
        raise ConfigError(f"cold start: {len(task_names)} task(s) but {len(difficulties)} difficulties")
    out = []
    for spec, given in zip(task_names, difficulties):
        name, in_spec = parse_task_spec(spec)
        if in_spec is not None and given is not None and in_spec != given:
            raise ConfigError(f"cold start: {spec!r} and difficulty {given} disagree")
        diff = in_spec if in_spec is not None else (given if given is not None else DEFAULT_DIFFICULTY)
        get_task(name)  # unknown names fail here, listing the known ones
        out.append((name, int(diff)))
    return out


def make_cold_start(task_names: Sequence[str], n: int, difficulties: int | Sequence[int | None] | None = None,
                    seed: int = 0, answer_only_fraction: float = 0.0) -> list[dict[str, Any]]:
    """``n`` chat examples in total, split as evenly as possible over the tasks (the first ones take the
    remainder), interleaved task by task. ``task_names`` may carry ``:DIFFICULTY``; ``difficulties`` is
    one value for all tasks or one per task (default 1). Each record is ``{"messages": [...], "task",
    "difficulty"}``; problem seeds stay below :data:`EVAL_SEED_BASE`. ``answer_only_fraction`` of the
    examples (seeded) state the answer without the working (:func:`~nanoseek.tasks.base.answer_only`)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"cold start: n must be a positive integer, got {n!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < EVAL_SEED_BASE:
        raise ConfigError(f"cold start: seed must lie in [0, {EVAL_SEED_BASE}) (the seeds above are held out "
                          f"for evaluation), got {seed!r}")
    specs = _specs(task_names, difficulties)
    per_task = [n // len(specs) + (1 if i < n % len(specs) else 0) for i in range(len(specs))]
    columns = []
    for (name, diff), count in zip(specs, per_task):
        task = get_task(name)
        try:
            problems = task.generate(seed, count, diff)
        except NanoseekError:
            raise
        except (ValueError, OSError) as exc:
            raise NanoseekError(f"cold start: task {name} cannot generate problems: {exc}") from None
        if any(not problem.solution.strip() for problem in problems):
            raise NanoseekError(f"cold start: task {name} has no worked solutions to learn from")
        column = []
        for problem in answer_only_mix(problems, answer_only_fraction, seed):
            column.append({"messages": chat_messages(problem, with_completion=True), "task": name,
                           "difficulty": diff})
        columns.append(column)
    records = []
    for i in range(max(per_task)):
        records.extend(column[i] for column in columns if i < len(column))
    return records


def write_jsonl(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``records`` one JSON object per line (atomically: tmp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


__all__ = ["make_cold_start", "parse_task_spec", "write_jsonl"]
