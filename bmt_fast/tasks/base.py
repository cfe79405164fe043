"""The task interface the trainer uses: examples as text-to-text pairs, official metrics, data loading.

A task turns a row of its `datasets` schema into an `Example` (input text, target text, gold label) and
scores predictions with its official metrics. `bmt_fast.tasks.registry` holds the named tasks (GLUE,
SuperGLUE, SQuAD, ReCoRD, and the built-in synthetic family); tests and the demo may build
`InMemoryTask`s directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    """One text-to-text example.

    label: the gold class index (classification), value (regression) or None.
    answers: every acceptable answer string (extractive QA), for exact match / F1.
    group: an id shared by examples scored together (e.g. a MultiRC question).
    """

    input_text: str
    target_text: str
    label: int | float | None = None
    answers: tuple[str, ...] = ()
    group: str | None = None


class Task(ABC):
    """A named task: where its data lives, how a row becomes an Example, how predictions are scored."""

    name: str = ""
    hub_path: str = ""                       # datasets.load_dataset path, e.g. "nyu-mll/glue"
    hub_config: str | None = None            # e.g. "rte"
    splits: Mapping[str, str] = {"train": "train", "validation": "validation", "test": "test"}
    label_words: tuple[str, ...] | None = None  # target text of each class (rank classification)
    metric_names: tuple[str, ...] = ("accuracy",)
    columns: tuple[str, ...] = ()            # hub columns `format` reads; loading checks they exist
    hub_parquet_export: bool = False         # read the hub's Parquet export (repo holds a loading script)

    @abstractmethod
    def format(self, row: Mapping[str, Any]) -> Example:
        """Turn one row of the hub's schema into an Example; a missing column raises KeyError naming it."""

    @abstractmethod
    def compute_metrics(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        """Official metrics of the task for predicted target texts (one per example)."""

    @property
    def is_classification(self) -> bool:
        return self.label_words is not None

    def load(self, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
        """Examples of one split: from `data_dir` (hub-schema JSONL/CSV/Parquet files) or the hub; the first
        `limit` rows, and where the last of them belongs to a group (MultiRC: the answer options of one
        question) the rest of that group too, since a group is scored whole (a question cut after one of
        its options had counted as exactly right from that option alone)."""
        from .loading import load_rows  # datasets is imported only when data is actually loaded

        rows = load_rows(self, split, data_dir)
        if limit is None or limit >= len(rows):
            return [self._format_row(row, i) for i, row in enumerate(rows)]
        examples = [self._format_row(row, i) for i, row in enumerate(rows[:limit])]
        for i, row in enumerate(rows[limit:], limit):
            if not examples or examples[-1].group is None:
                break
            example = self._format_row(row, i)
            if example.group != examples[-1].group:
                break
            examples.append(example)
        return examples

    def _format_row(self, row: dict, index: int) -> Example:
        """format(row), a row it cannot read named by its place in the split (1 = the first data row)."""
        try:
            return self.format(row)
        except (ValueError, KeyError, TypeError) as error:  # (TypeError: a null where a number goes)
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise ValueError(f"row {index + 1}: {message}") from error

    def check_split(self, split: str, data_dir: str | Path | None = None) -> None:
        """Raise ValueError / FileNotFoundError when `load(split, data_dir)` clearly cannot work, without
        loading the data: an unknown split; with `data_dir`, no file, an empty one, or one without the
        columns `format` reads (looked for in the file's header or first record). Values (labels) are
        checked when the split loads. A task that overrides `load` is checked only if it overrides this."""
        if type(self).load is not Task.load:
            return
        from .loading import check_split

        check_split(self, split, data_dir)


@dataclass
class InMemoryTask(Task):
    """A task over examples held in memory (synthetic tasks, tests). Accuracy over label words or exact
    match of the target text."""

    name: str = "in_memory"
    examples: Mapping[str, Sequence[Example]] = field(default_factory=dict)
    label_words: tuple[str, ...] | None = None
    metric_names: tuple[str, ...] = ("accuracy",)

    def __post_init__(self) -> None:
        # (this compute_metrics scores accuracy alone; a subclass's own may score others)
        if type(self).compute_metrics is InMemoryTask.compute_metrics and tuple(self.metric_names) != ("accuracy",):
            raise ValueError(
                f"InMemoryTask {self.name!r} scores accuracy only, got metric_names {tuple(self.metric_names)!r}; "
                "for other metrics, subclass it and override compute_metrics"
            )

    def format(self, row: Mapping[str, Any]) -> Example:
        return Example(str(row["input_text"]), str(row["target_text"]), row.get("label"))

    def load(self, split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
        self.check_split(split, data_dir)
        examples = list(self.examples[split])
        return examples[:limit] if limit is not None else examples

    def check_split(self, split: str, data_dir: str | Path | None = None) -> None:
        if split not in self.examples:
            raise ValueError(f"task {self.name!r} has no split {split!r}; it has {sorted(self.examples)}")

    def compute_metrics(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        if len(predictions) != len(examples):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
        if not examples:
            raise ValueError("no examples to score")
        correct = sum(p.strip() == e.target_text.strip() for p, e in zip(predictions, examples))
        return {"accuracy": correct / len(examples)}
