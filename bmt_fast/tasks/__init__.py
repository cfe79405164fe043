"""Tasks: the text-to-text interface (`base`), the registry of named tasks, data loading and metrics."""

from .base import SPLITS, Example, InMemoryTask, Task
from .registry import get_task, register_task, task_names

__all__ = ["SPLITS", "Example", "InMemoryTask", "Task", "get_task", "register_task", "task_names"]
