"""Metrics as JSON lines: one record per log event, each with a `step`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends records to `path`; `truncate_after(step)` drops what a killed run logged past its checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(to_json(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Keep the records up to `step` (and drop a last line a killed run left half written)."""
        if not self.path.exists():
            return
        self._rewrite([r for r in read_metrics(self.path) if r.get("step", 0) <= step])

    def drop_last(self, step: int, keys: set[str]) -> None:
        """Remove the last record of `step` that holds all of `keys` (a window's line; other lines of that
        step, e.g. an evaluation's, stay)."""
        if not self.path.exists():
            return
        records = read_metrics(self.path)
        for index in range(len(records) - 1, -1, -1):
            if records[index].get("step") == step and keys <= records[index].keys():
                del records[index]
                self._rewrite(records)
                return

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(to_json(r) + "\n" for r in records))
        tmp.replace(self.path)


class RunFileError(ValueError):
    """A run folder's record file (metrics.jsonl, eval.json) that does not parse (the CLI reports it in one
    line)."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return list(_records(Path(path)))


def _records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file. A last line that is not JSON is what a run killed mid-write leaves: it
    is skipped with a warning; any other line that is not JSON, or not an object with an integer `step`
    (a file of another program: plot had raised an AttributeError or KeyError), is an error naming the file
    and line."""
    if not path.exists():
        return
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as error:
        raise RunFileError(f"{path}: not a text file of JSON records ({error})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                logger.warning("%s: skipping its last line, which is cut short (%s)", path, error)
                return
            raise RunFileError(f"{path}, line {number}: not a JSON record ({error})") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise RunFileError(f"{path}, line {number}: not a metrics record (a JSON object with an integer 'step')")
        yield record


def to_json(value: Any, indent: int | None = None) -> str:
    """Strict JSON text of `value` after `plain` (NaN/Inf written as null, which JSON parsers accept)."""
    return json.dumps(plain(value), indent=indent, allow_nan=False)


def plain(value: Any) -> Any:
    """Floats, ints, strings, lists and dicts only; NaN/Inf become None (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
