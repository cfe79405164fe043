"""`python -m bmt_fast.tasks`: list the registered tasks, or load some and show their first examples.

    python -m bmt_fast.tasks                                   # the task table
    python -m bmt_fast.tasks --data-dir DIR rte squad          # check local files: DIR/rte/validation.jsonl ...
    python -m bmt_fast.tasks --split train --show 3 mnli       # from the hub when online
"""

from __future__ import annotations

import argparse
import sys

from . import get_task, task_names
from .benchmarks import RegressionTask
from .loading import is_load_error, load_error_message


def _table() -> str:
    rows = [("task", "hub id", "config", "metrics", "targets")]
    for name in task_names():
        task = get_task(name)
        if task.label_words:
            targets = " / ".join(task.label_words)
        else:
            targets = "score as a number" if isinstance(task, RegressionTask) else "answer text"
        rows.append((name, task.hub_path or "(built in)", task.hub_config or "", ", ".join(task.metric_names), targets))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bmt_fast.tasks", description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", help="task names to load (none: list all tasks)")
    parser.add_argument("--data-dir", help="folder with <task>/<split>.jsonl|.csv|.parquet in the hub's schema "
                                           "(default: load from the hub)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--show", type=_count, default=2, help="examples to print per task")
    args = parser.parse_args(argv)
    if not args.tasks:
        print(_table())
        return 0
    status = 0
    for name in args.tasks:
        try:
            examples = get_task(name).load(args.split, data_dir=args.data_dir)
        except Exception as error:  # (OSError covers missing files and ConnectionError)
            if not is_load_error(error):
                raise
            print(f"error: {name}: {load_error_message(error)}", file=sys.stderr)
            status = 1
            continue
        print(f"{name} {args.split}: {len(examples)} examples")
        for example in examples[: args.show]:
            print(f"  input:  {example.input_text}")
            print(f"  target: {example.target_text}")
    return status


if __name__ == "__main__":
    sys.exit(main())
