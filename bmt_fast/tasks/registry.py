"""Named tasks. The GLUE/SuperGLUE/SQuAD/ReCoRD definitions register themselves here."""

from __future__ import annotations

from .base import Task

_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if not task.name:
        raise ValueError("a task needs a name")
    _TASKS[task.name] = task
    return task


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        known = ", ".join(task_names()) or "none registered"
        raise ValueError(f"unknown task {name!r}; known tasks: {known}")
    return _TASKS[name]
