"""Rows of a task's split through `datasets.load_dataset`: local hub-schema files or the hub.

Local files: `<data_dir>/<task name>/<split>.{jsonl,json,csv,parquet}`, where `<split>` is the task's
split name (`train`, `validation`, ...) or the hub's name for it (`validation_matched` for MNLI). The
columns are those of the hub's schema; nested columns (SQuAD `answers`, MultiRC `idx`) need JSONL or
Parquet. Hub: `load_dataset(hub_path, hub_config, split=...)`, or the hub's Parquet export of the repo
for tasks whose repo still holds a loading script (SuperGLUE), which `datasets` >= 4 no longer runs.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Task

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# The branch where the hub keeps a Parquet copy of every dataset, one folder per config and split.
PARQUET_EXPORT_REVISION = "refs/convert/parquet"


def load_rows(task: "Task", split: str, data_dir: str | Path | None) -> list[dict[str, Any]]:
    _check_split_name(task, split)
    dataset = _load_local(task, split, Path(data_dir)) if data_dir is not None else _load_hub(task, split)
    _check_columns(task, split, dataset.column_names)
    return [dict(row) for row in dataset]


def check_split(task: "Task", split: str, data_dir: str | Path | None) -> None:
    """What `load_rows` would refuse, found without loading the data (see Task.check_split)."""
    _check_split_name(task, split)
    if data_dir is None:
        return
    path = local_split_file(task, split, Path(data_dir))
    try:
        columns = _local_columns(path)
    except ValueError as error:
        raise ValueError(f"task {task.name!r}, split {split!r}: {error}") from error
    if columns is not None:
        _check_columns(task, split, columns, path)


def _check_split_name(task: "Task", split: str) -> None:
    if split not in task.splits:
        raise ValueError(f"task {task.name!r} has no split {split!r}; it has {sorted(task.splits)}")


def _local_columns(path: Path) -> list[str] | None:
    """The columns of a local split file from its header or first record (None: not known without
    reading it all); ValueError when the file holds no rows at all."""
    if _is_empty(path):
        raise ValueError(f"{path} is empty")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as error:  # pyarrow's ArrowInvalid and friends
            raise ValueError(f"{path} is not a Parquet file: {error}") from error
    # (utf-8-sig: a byte-order mark, as Excel's "CSV UTF-8" writes, had become part of the first column's name
    # here while the loader reads the file without it)
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        first = next(line for line in f if line.strip())
    if path.suffix == ".csv":
        import csv

        return next(csv.reader([first]))
    if path.suffix == ".jsonl":
        try:
            record = json.loads(first)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: the first line is not a JSON record ({error})") from error
        return list(record) if isinstance(record, dict) else None
    return None  # .json: one JSON document (records or columns) or JSON lines


def local_split_file(task: "Task", split: str, data_dir: Path) -> Path:
    """The one file holding `split` of `task` under `data_dir`; a clear error when there is none or several."""
    folder = data_dir / task.name
    stems = dict.fromkeys((split, task.splits[split]))  # ordered, without the duplicate when equal
    for stem in stems:
        files = sorted(p for p in folder.glob(f"{stem}.*") if p.suffix in _FORMATS) if folder.is_dir() else []
        if len(files) > 1:
            raise ValueError(f"task {task.name!r}: several files for split {split!r}: {[p.name for p in files]}")
        if files:
            return files[0]
    expected = " or ".join(f"{stem}.jsonl/.csv/.parquet" for stem in stems)
    raise FileNotFoundError(f"no {split} file for task {task.name!r} in {folder} (expected {expected})")


def _load_local(task: "Task", split: str, data_dir: Path):
    import datasets

    path = local_split_file(task, split, data_dir)
    if _is_empty(path):  # `datasets` stops with a bare StopIteration on an empty JSON file
        raise ValueError(f"task {task.name!r}: {path} is empty")
    # CSV: pandas reads "NA", "null", "N/A", "nan", ... as missing by default, which refused a sentence
    # that says "null"; only an empty field is missing here (the text columns then fail as null).
    options = {"keep_default_na": False, "na_values": [""]} if path.suffix == ".csv" else {}
    # data_files are glob patterns to `datasets`: the path is escaped (a folder named "data[v1]" had read as a
    # character class, matched nothing, and the JSON loader stopped with a bare StopIteration)
    files = {split: glob.escape(str(path))}
    return datasets.load_dataset(_FORMATS[path.suffix], data_files=files, split=split, **options)


def is_load_error(error: BaseException) -> bool:
    """Whether `error`, raised by Task.load, says the data does not load (a missing or malformed file, a row
    the task cannot read, the hub unreachable) rather than a fault of the code: ValueError, KeyError, OSError,
    and the errors of `datasets` and pyarrow (a malformed line: DatasetGenerationError, ArrowInvalid)."""
    if isinstance(error, (ValueError, KeyError, OSError)):
        return True
    return isinstance(error, Exception) and type(error).__module__.startswith(("datasets", "pyarrow"))


def load_error_message(error: BaseException) -> str:
    """One line about a load error (is_load_error): its own message, with the type and the cause for those of
    `datasets` and pyarrow (whose messages alone do not say what failed), at most 2,000 characters."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    if isinstance(error, (ValueError, KeyError, OSError)):
        return str(error)
    cause = f" ({type(error.__cause__).__name__}: {error.__cause__})" if error.__cause__ else ""
    return f"{type(error).__name__}: {error}{cause}"[:2000]


def parquet_export_files(task: "Task", split: str) -> str:
    """hf:// glob of one config/split of the hub's Parquet export of the task's repo."""
    return f"hf://datasets/{task.hub_path}@{PARQUET_EXPORT_REVISION}/{task.hub_config}/{task.splits[split]}/*.parquet"


def _load_hub(task: "Task", split: str):
    import datasets

    hub_split = task.splits[split]
    try:
        if task.hub_parquet_export:
            files = {hub_split: parquet_export_files(task, split)}
            return datasets.load_dataset("parquet", data_files=files, split=hub_split)
        return datasets.load_dataset(task.hub_path, task.hub_config, split=hub_split)
    except ConnectionError as error:  # offline, or the hub is unreachable
        raise ConnectionError(
            f"task {task.name!r}: could not load {task.hub_path} (config {task.hub_config}, split {hub_split}) "
            f"from the hub: {error}. Pass a data directory (the trainer's data.data_dir=DIR, python -m "
            f"bmt_fast.tasks --data-dir DIR, or Task.load(..., data_dir=DIR)) holding "
            f"{task.name}/{split}.jsonl, .csv or .parquet in the hub's schema."
        ) from error


def _is_empty(path: Path) -> bool:
    """No bytes, or (text formats) only whitespace; reads up to the first other byte."""
    if path.suffix == ".parquet":
        return path.stat().st_size == 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _check_columns(task: "Task", split: str, column_names: list[str], path: Path | None = None) -> None:
    missing = [column for column in task.columns if column not in column_names]
    if missing:
        where = f" ({path})" if path is not None else ""
        raise ValueError(
            f"task {task.name!r}, split {split!r}{where}: missing column(s) {missing}; "
            f"the data has {sorted(column_names)}"
        )
