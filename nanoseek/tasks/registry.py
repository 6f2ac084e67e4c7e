"""Name -> task registry. The built-in families register themselves on import."""

from __future__ import annotations

from .arithmetic import ArithmeticTask
from .base import RegistryError, Task
from .countdown import CountdownTask
from .gsm8k import GSM8KTask
from .linear import LinearTask
from .passkey import PasskeyTask

__all__ = ["TASKS", "register_task", "get_task", "list_tasks"]

#: Registered tasks by name. Prefer :func:`register_task` to editing it directly.
TASKS: dict[str, Task] = {}


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    """Add ``task`` (a :class:`Task` instance) under ``task.name``; returns it.

    Re-registering a name raises unless ``overwrite=True`` (e.g. to swap the data-less
    ``gsm8k`` task for ``GSM8KTask.from_file(path)``).
    """
    if not isinstance(task, Task):
        raise TypeError(f"expected a Task instance, got {type(task).__name__}")
    if not isinstance(task.name, str) or not task.name:
        raise ValueError(f"{type(task).__name__} has no name")
    if task.name in TASKS and not overwrite:
        raise ValueError(f"task {task.name!r} is already registered (pass overwrite=True)")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task registered as ``name``; raises :class:`RegistryError` listing known names."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise RegistryError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def list_tasks() -> list[str]:
    return sorted(TASKS)


for _task in (ArithmeticTask(), CountdownTask(), LinearTask(), GSM8KTask(), PasskeyTask()):
    register_task(_task)
del _task
