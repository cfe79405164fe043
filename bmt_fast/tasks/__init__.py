"""Tasks: the text-to-text interface (`base`), the registry of named tasks, data loading and metrics.

Importing this package registers the benchmark tasks (`benchmarks`: GLUE, SuperGLUE, SQuAD) and the
built-in synthetic family (`synthetic`), so `get_task("rte")` works after `import bmt_fast.tasks`.
"""

from . import benchmarks as _benchmarks  # noqa: F401  (registers the GLUE/SuperGLUE/SQuAD tasks)
from . import synthetic as _synthetic  # noqa: F401  (registers the synthetic/... demo family)
from .base import SPLITS, Example, InMemoryTask, Task
from .registry import get_task, register_task, task_names

__all__ = ["SPLITS", "Example", "InMemoryTask", "Task", "get_task", "register_task", "task_names"]
