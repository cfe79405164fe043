"""`bmt-fast bench <op> [options]`: the benchmarks of the source tree, run from the command line.

The benchmarks are the top-level `benchmarks/` folder of the repository, not part of the installed package
(they need the repository's results folder, and providers a user may not have). This finds them in the
checkout that holds the imported bmt_fast (an editable install, or running from the repository root), else
in the current directory, and dispatches to `benchmarks.main`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

NOT_FOUND = (
    "the benchmarks ship with the source tree (the top-level benchmarks/ folder of the bmt_fast repository), "
    "not with the installed package. Run this command from the root of a bmt_fast checkout (or install the "
    "checkout with `pip install --no-build-isolation -e .`), or run `python -m benchmarks <op> --quick` there."
)


class BenchmarksNotFound(RuntimeError):
    pass


def candidate_roots() -> list[Path]:
    """Where a checkout may be: the folder above the imported bmt_fast package, then the current directory."""
    import bmt_fast

    roots = [Path(bmt_fast.__file__).resolve().parent.parent, Path.cwd().resolve()]
    return list(dict.fromkeys(roots))


def is_checkout(root: Path) -> bool:
    return (root / "benchmarks" / "__init__.py").is_file() and (root / "benchmarks" / "harness.py").is_file()


def load_benchmarks():
    """The `benchmarks` package of the first checkout found (its root goes first on sys.path)."""
    root = next((r for r in candidate_roots() if is_checkout(r)), None)
    if root is None:
        raise BenchmarksNotFound(NOT_FOUND)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module("benchmarks")
    found = Path(module.__file__).resolve().parent
    if found != root / "benchmarks":
        raise BenchmarksNotFound(f"`import benchmarks` gives {found}, not the checkout's {root / 'benchmarks'}: "
                                 "another package of that name comes first on sys.path")  # fmt: skip
    package = candidate_roots()[0]
    if package != root:  # the harness's worker runs in the checkout and imports its bmt_fast
        print(f"bmt-fast bench: benchmarks from {root} (the imported bmt_fast is not from that checkout: "
              f"its benchmark workers import {root / 'bmt_fast'})", file=sys.stderr)  # fmt: skip
    return module


def run(op: str | None, options: list[str]) -> int:
    """Runs `benchmarks.main([op, *options])` (no op: its usage, naming the ops); 2 when the benchmarks are not
    there."""
    try:
        benchmarks = load_benchmarks()
    except BenchmarksNotFound as exc:
        print(f"bmt-fast bench: {exc}", file=sys.stderr)
        return 2
    benchmarks.main([op, *options] if op else list(options))
    return 0
