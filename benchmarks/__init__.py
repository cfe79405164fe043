"""Benchmarks of the bmt_fast ops side by side with the tools users would pick instead.

    python -m benchmarks.svgd_step --quick          # about a minute on a CPU
    python -m benchmarks.svgd_step                  # the full sweep for this device
    python -m benchmarks svgd_step --sizes 8192x128  # the same through the dispatcher below
    python -m benchmarks.plot --readme README.md    # PNGs and the README table from the CSVs

Each op module exposes `main(argv)`; `main(["svgd_step", "--quick"])` here dispatches by op name (the hook
for a `bmt-fast bench` command). See `benchmarks/harness.py` for how timing and memory are measured.
"""

from __future__ import annotations

import importlib

OPS = ("svgd_step", "rbf_kernel", "median_bandwidth")


def main(argv: list[str] | None = None) -> list[dict]:
    """`<op> [options]`: run one op's benchmark; returns the rows it appended to the CSV."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in OPS:
        raise SystemExit(f"usage: python -m benchmarks {{{','.join(OPS)}}} [--quick] [options]; "
                         "`python -m benchmarks.<op> --help` lists the options")
    return importlib.import_module(f"benchmarks.{argv[0]}").main(argv[1:])
