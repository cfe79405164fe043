"""Rows of a task's split through `datasets.load_dataset`: local hub-schema files or the hub."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Task

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(task: "Task", split: str, data_dir: str | Path | None) -> list[dict[str, Any]]:
    if split not in task.splits:
        raise ValueError(f"task {task.name!r} has no split {split!r}; it has {sorted(task.splits)}")
    import datasets

    if data_dir is None:
        dataset = datasets.load_dataset(task.hub_path, task.hub_config, split=task.splits[split])
        return [dict(row) for row in dataset]
    folder = Path(data_dir) / task.name
    files = sorted(p for p in folder.glob(f"{split}.*") if p.suffix in _FORMATS) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no {split} file for task {task.name!r} in {folder} (expected {split}.jsonl, .csv or .parquet)"
        )
    dataset = datasets.load_dataset(_FORMATS[files[0].suffix], data_files={split: str(files[0])}, split=split)
    return [dict(row) for row in dataset]
