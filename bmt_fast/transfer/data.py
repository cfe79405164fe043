"""Task data for training: examples encoded once, and a resumable per-task mini-batch sampler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..tasks import Example, Task
from ..tasks.loading import is_load_error, load_error_message
from .prompts import Batch, Encoded, PromptedModel


@dataclass
class TaskData:
    task: Task
    examples: list[Example]
    encoded: list[Encoded]

    @property
    def name(self) -> str:
        return self.task.name

    def __len__(self) -> int:
        return len(self.examples)


class DataError(ValueError):
    """A split that does not load (a missing file, a row the task cannot read, no examples at all)."""


def load_examples(task: Task, split: str, data_dir: str | None = None, limit: int | None = None) -> list[Example]:
    """task.load(...), its errors as DataError (the CLI reports them without a traceback): also a file that
    `datasets` or pyarrow cannot parse (a malformed line anywhere in it), and examples without a label (every
    caller trains or scores them)."""
    where = _split_file(task, split, data_dir)
    try:
        examples = task.load(split, data_dir, limit=limit)
    except Exception as error:
        if not is_load_error(error):
            raise
        raise DataError(f"{task.name} {split}{where}: {load_error_message(error)}") from error
    if not examples:
        raise DataError(f"task {task.name!r} has no {split} examples{where}")
    missing = [i for i, e in enumerate(examples) if e.label is None and not e.answers and not e.target_text.strip()]
    if missing:
        first = examples[missing[0]].input_text
        raise DataError(
            f"task {task.name!r}, split {split!r}{where}: {len(missing)} of {len(examples)} examples have no label "
            f"(label -1, or no answers: a hidden test split?), the first example {missing[0]} of the split (0-based), "
            f"input {first[:60] + ('...' if len(first) > 60 else '')!r}; training and scoring need labelled examples"
        )
    return examples


def _split_file(task: Task, split: str, data_dir: str | None) -> str:
    """' (<the file>)' of a split read from data_dir, for the errors about its rows; '' otherwise."""
    if data_dir is None:
        return ""
    from ..tasks.loading import local_split_file

    try:
        return f" ({local_split_file(task, split, Path(data_dir))})"
    except (ValueError, KeyError, OSError):  # (no such file: the load's own error says so)
        return ""


def load_task_data(
    pm: PromptedModel, task: Task, split: str, data_dir: str | None = None, limit: int | None = None
) -> TaskData:
    pm.check_label_words(task.name, task.label_words)
    examples = load_examples(task, split, data_dir, limit)
    encoded = pm.encode_reporting_cuts(examples, f"task {task.name}, split {split}")
    return TaskData(task, examples, encoded)


def task_batch_sizes(sizes: Sequence[int], batch_size: int, sampling: str) -> list[int]:
    """Examples drawn from each task per step.

    uniform: batch_size from every task. proportional: K * batch_size in all, split in proportion to the
    task sizes (rounded, at least one each), so the mixed batch is close to a uniform sample of the union
    of the tasks (the likelihood's weights do not depend on it: source.likelihood_coefficients).
    """
    if sampling == "uniform" or len(sizes) == 1:
        return [batch_size] * len(sizes)
    if sampling != "proportional":
        raise ValueError(f"sampling must be 'proportional' or 'uniform', got {sampling!r}")
    total = len(sizes) * batch_size
    return [max(1, round(total * n / sum(sizes))) for n in sizes]


class TaskSampler:
    """Each step, `sample()` gives a batch of example indices from every task.

    Each task is read in shuffled epochs (every example once per epoch, reshuffled when exhausted). The
    whole state (generator, permutations, positions) is in `state_dict()`, so a resumed run draws the
    same batches as one that never stopped.
    """

    def __init__(self, sizes: Sequence[int], batch_sizes: Sequence[int], seed: int):
        if len(sizes) != len(batch_sizes) or not sizes:
            raise ValueError("need one batch size per task, and at least one task")
        if min(sizes) < 1 or min(batch_sizes) < 1:
            raise ValueError(f"task sizes and batch sizes must be >= 1, got {list(sizes)}, {list(batch_sizes)}")
        self.sizes = list(sizes)
        self.batch_sizes = list(batch_sizes)
        self.generator = torch.Generator().manual_seed(seed)
        self.orders = [torch.randperm(n, generator=self.generator) for n in self.sizes]
        self.positions = [0] * len(self.sizes)

    def sample(self) -> list[list[int]]:
        return [self._take(k, b) for k, b in enumerate(self.batch_sizes)]

    def _take(self, task: int, count: int) -> list[int]:
        picked: list[int] = []
        while len(picked) < count:
            if self.positions[task] == self.sizes[task]:
                self.orders[task] = torch.randperm(self.sizes[task], generator=self.generator)
                self.positions[task] = 0
            start = self.positions[task]
            stop = min(self.sizes[task], start + count - len(picked))
            picked.extend(self.orders[task][start:stop].tolist())
            self.positions[task] = stop
        return picked

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "orders": list(self.orders), "positions": list(self.positions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = [len(order) for order in state["orders"]]
        if saved != self.sizes:  # (a larger split had been drawn from the old order, a smaller had raised IndexError)
            raise DataError(
                f"the training data changed since this checkpoint: its tasks had {saved} examples, they have "
                f"{self.sizes} now; use the data it was trained on, or train the stage again (--overwrite)"
            )
        self.generator.set_state(state["generator"])
        self.orders = [t.clone() for t in state["orders"]]
        self.positions = [int(p) for p in state["positions"]]


def make_batches(pm: PromptedModel, tasks: Sequence[TaskData], indices: Sequence[Sequence[int]]) -> list[Batch]:
    return [pm.collate([data.encoded[i] for i in idx]) for data, idx in zip(tasks, indices)]
