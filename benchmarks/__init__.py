"""Benchmarks of the bmt_fast ops side by side with the tools users would pick instead.

    python -m benchmarks.svgd_step --quick          # about a minute on a CPU
    python -m benchmarks.svgd_step                  # the full sweep for this device
    python -m benchmarks svgd_step --sizes 8192x128  # the same through the dispatcher below
    python -m benchmarks.prompt_transfer_step       # end to end: one prompt-transfer step, batched vs sequential
    python -m benchmarks.plot --readme README.md    # PNGs and the README table from the CSVs

Each op module exposes `main(argv)`; `main(["svgd_step", "--quick"])` here dispatches by op name, and
`main(["plot", ...])` to `benchmarks.plot` (`bmt-fast bench` calls it). See `benchmarks/harness.py` for how
timing and memory are measured.
"""

from __future__ import annotations

import importlib

OPS = ("svgd_step", "svgd_step_vmap", "rbf_kernel", "rbf_kernel_grad", "median_bandwidth", "kde_prior",
       "prompt_transfer_step")
USAGE = (f"usage: python -m benchmarks {{{','.join(OPS)}}} [--quick] [options], or python -m benchmarks plot "
         "[options]; `python -m benchmarks.<op> --help` lists the options")  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    """`<op> [options]`: run one op's benchmark; returns the rows it appended to the CSV.
    `plot [options]`: the PNGs and README table from the CSVs (returns no rows)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        importlib.import_module("benchmarks.plot").main(argv[1:])
        return []
    if not argv or argv[0] not in OPS:  # (a usage error: exit status 2, as argparse gives)
        print(USAGE if not argv or argv[0].startswith("-") else f"unknown op {argv[0]!r}; {USAGE}", file=sys.stderr)
        raise SystemExit(2)
    return importlib.import_module(f"benchmarks.{argv[0]}").main(argv[1:])
