"""Where one call's time goes: every kernel (GPU) or operator (CPU) a provider runs, from torch.profiler.

    python -m benchmarks.profile --op svgd_step --sizes 16x409600 --providers bmt_fast-cpu
    python -m benchmarks.profile --device cuda --dtype bfloat16 --sizes 65536x128 \\
        --providers bmt_fast-cuda,bmt_fast-triton --out build/profile.txt

The benchmarks time whole calls; this splits a call into its launches (a memset, the Gram kernel, the
apply kernel, ...) with their time per call and count, so that a slow row shows which part to tune. The
provider runs `--warmup` times untimed (Triton compiles and autotunes then), then `--calls` times under
the profiler.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import harness
from benchmarks.providers import providers_for

OPS = ("svgd_step", "rbf_kernel", "median_bandwidth")


def profile_case(op: str, provider: str, case: harness.Case, dtype: torch.dtype, device: torch.device,
                 calls: int, warmup: int, rows: int) -> str:  # fmt: skip
    """The profiler's table for `calls` calls of `provider` on `case`, times per call."""
    spec = importlib.import_module(f"benchmarks.{op}").SPEC
    entry = providers_for(op)[provider]
    why = entry.unavailable(device, dtype)
    if why:
        raise RuntimeError(f"{provider} cannot run on {device}: {why}")
    run = entry.build(spec.make_inputs(case, dtype, device))
    for _ in range(warmup):
        run()
    harness.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            run()
        harness.synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=70)
    header = (f"== {op} {provider} {case} {str(dtype).removeprefix('torch.')} on {harness.device_name(device)}: "
              f"{calls} calls (totals below are for all {calls})")  # fmt: skip
    return header + "\n" + table


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=OPS, default="svgd_step")
    ap.add_argument("--providers", required=True, help="comma-separated provider names")
    ap.add_argument("--sizes", type=harness.parse_sizes, required=True, help="NxD[,NxD...]")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(harness.DTYPES), default="float32")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", type=int, default=15, help="table rows per case")
    ap.add_argument("--out", type=Path, help="also append the tables to this file")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.warmup < 0:
        ap.error("--calls must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    try:
        names = harness.chosen_providers(args.providers, providers_for(args.op))
    except ValueError as exc:
        ap.error(str(exc))
    tables = []
    for case in args.sizes:
        for name in names:
            text = profile_case(args.op, name, case, harness.DTYPES[args.dtype], device, args.calls, args.warmup,
                                args.rows)  # fmt: skip
            print(text, flush=True)
            tables.append(text)
    report = "\n".join(tables)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(report + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
