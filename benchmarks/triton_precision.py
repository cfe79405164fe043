"""Error of the Triton kernels' dot-precision modes against the float64 reference (not a timing).

    TRITON_INTERPRET=1 python -m benchmarks.triton_precision     # no GPU: Triton's interpreter on the CPU
    python -m benchmarks.triton_precision                        # on a GPU

For each op, regime, input dtype and dot mode, the largest relative error (max |out - ref| / max |ref|)
over a few random inputs, beside torch's own error in the same input dtype (the yardstick of the test
rule). What the modes compute (bmt_fast.kernels.utils.dot_mode):

  fp32 / ieee    exact fp32 products, fp32 accumulation (default for fp32 inputs: allow_tf32=None)
  fp32 / tf32    allow_tf32=True: operands rounded to TF32 (10 mantissa bits, round to nearest) in the
                 kernel, then the dot. On a GPU the tensor cores multiply these exactly; the interpreter
                 multiplies the same rounded values in fp32: the same arithmetic up to summation order.
  fp16 / split   default for fp16 inputs: operands split into hi + lo bf16 parts, four products
                 ((hi + lo)(hi' + lo'); three, without lo lo', until 2026-12-07), fp32 accumulation
  half / half    default for bf16 inputs, and allow_tf32=True for fp16: one product of the operands
                 rounded to bf16
  half / ieee    allow_tf32=False: exact fp32 products
Products of half-dtype values are exact in fp32, so the interpreter (which keeps them in fp32: its own
half dot is wrong) computes what the tensor cores compute, up to summation order.
The reference gets the inputs exactly as the kernel does (rounded to the input dtype, then float64).
Rows are appended to benchmarks/results/triton_precision_<device>.csv with the device and versions.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
from pathlib import Path

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import triton  # noqa: E402

import bmt_fast  # noqa: E402
from bmt_fast import reference  # noqa: E402
from bmt_fast.triton_backend import TRITON  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (op, algorithm, n, d, data): both regimes of each op at sizes the interpreter handles in seconds. data:
# "gaussian" (N(3, 1.5^2) per feature) or "clusters" (two clusters 0.05 wide whose centres are drawn
# N(0, 10^2) per feature, H from the distances within a cluster: particles far apart next to the kernel's
# width, where the step splits its second product: kernels/svgd_step.py, splits_w).
CASES = [
    ("svgd_step", "tiled", 130, 129, "gaussian"),
    ("svgd_step", "tiled", 300, 128, "gaussian"),  # d <= 128 in a tensor-core mode: the flash kernel
    ("svgd_step", "gram", 16, 4096, "gaussian"),
    ("rbf_kernel", "-", 130, 129, "gaussian"),
    ("median_bandwidth", "tiled", 130, 129, "gaussian"),
    ("median_bandwidth", "gram", 16, 4096, "gaussian"),
    ("svgd_step", "tiled", 256, 64, "clusters"),
    ("svgd_step", "tiled", 130, 129, "clusters"),
    ("svgd_step", "gram", 16, 1024, "clusters"),
    ("rbf_kernel", "-", 300, 128, "clusters"),
]
MODES = [
    (torch.float32, "ieee", None),
    (torch.float32, "tf32", True),
    (torch.bfloat16, "split", None),
    (torch.bfloat16, "half", True),
    (torch.bfloat16, "ieee", False),
    (torch.float16, "split", None),
    (torch.float16, "half", True),
    (torch.float16, "ieee", False),
]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def run_op(op: str, algorithm: str, x: torch.Tensor, score: torch.Tensor, h: torch.Tensor, allow_tf32):
    kernels = TRITON.kernels()
    if op == "svgd_step":
        return kernels.svgd_step_forward(x, score, h, algorithm=algorithm, allow_tf32=allow_tf32)
    if op == "rbf_kernel":
        return kernels.rbf_kernel_forward(x, score, h, allow_tf32=allow_tf32)
    return kernels.median_bandwidth_forward(x, algorithm=algorithm, allow_tf32=allow_tf32)


def run_reference(op: str, x: torch.Tensor, score: torch.Tensor, h: torch.Tensor):
    if op == "svgd_step":
        return reference.svgd_step(x, score, h.to(x.dtype))
    if op == "rbf_kernel":
        return reference.rbf_kernel(x, score, h.to(x.dtype))
    return reference.median_bandwidth(x)


def particles(n, d, data, dtype, device, generator):
    """(x, score, H) for a case: H the median rule's, or for clusters the median within one cluster."""
    if data == "clusters":
        centres = torch.randn(2, d, generator=generator, dtype=torch.float64) * 10
        x = centres[torch.arange(n) % 2] + 0.05 * torch.randn(n, d, generator=generator, dtype=torch.float64)
    else:
        x = torch.randn(n, d, generator=generator, dtype=torch.float64) * 1.5 + 3.0
    x = x.to(dtype).to(device)
    score = torch.randn(n, d, generator=generator, dtype=torch.float64).to(dtype).to(device)
    x64 = x.double()
    if data == "clusters":
        same = x64[0::2]
        h = torch.cdist(same, same).square().median()
    else:
        h = reference.median_bandwidth(x64)
    return x, score, h


def measure(op, algorithm, n, d, data, dtype, allow_tf32, seeds, device):
    errors, torch_errors = [], []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        x, score, h = particles(n, d, data, dtype, device, generator)
        if op == "rbf_kernel" and data == "clusters":
            score = x  # (K between the particles themselves: score, the other cases' y, lies far from them)
        x64, score64 = x.double(), score.double()
        expected = run_reference(op, x64, score64, h)
        errors.append(relative_error(run_op(op, algorithm, x, score, h, allow_tf32), expected))
        # torch in the accumulation dtype on the same inputs, centred by x[0] (fair to its norm expansion)
        shift = x64[:1]
        torch_out = run_reference(op, (x64 - shift).float(), (score64 - (shift if op == "rbf_kernel" else 0)).float(), h)
        torch_errors.append(relative_error(torch_out.to(dtype) if op != "median_bandwidth" else torch_out, expected))
    return max(errors), max(torch_errors)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}), Triton interpreter"


def selected(data: str, dtype: torch.dtype, dtypes: list[str] | None) -> bool:
    """Whether a case of `data` runs in `dtype` (the clusters cases are the 16-bit dtypes' products'), under
    --dtype's choice."""
    if data == "clusters" and dtype == torch.float32:
        return False
    return not dtypes or str(dtype).removeprefix("torch.") in dtypes


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"],
                        help="measure only these input dtypes (repeatable; default: all)")
    parser.add_argument("--case", action="append", metavar="OP,ALGORITHM,N,D",
                        help="measure only these cases (repeatable; default: all), e.g. svgd_step,tiled,300,128,gaussian")  # fmt: skip
    parser.add_argument("--out", type=Path, metavar="CSV",
                        help="append the rows to this file (default: benchmarks/results/triton_precision_<device>.csv)")
    args = parser.parse_args(argv)
    cases = CASES
    if args.case:
        wanted = {tuple(c.split(",")) for c in args.case}
        cases = [c for c in CASES if tuple(map(str, c)) in wanted]
        if len(cases) != len(wanted):
            parser.error(f"unknown case in {args.case}; cases: {[','.join(map(str, c)) for c in CASES]}")
    if not any(selected(data, dtype, args.dtype) for *_, data in cases for dtype, _, _ in MODES):
        # (an IndexError after the run before)
        parser.error(f"nothing to measure: the clusters cases run for bfloat16 and float16 only; --dtype {args.dtype}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not TRITON.supports(device):
        raise SystemExit(f"Triton cannot run on {device.type}: {TRITON.unavailable_reason()}")
    common = {
        "device": device_name(device),
        "interpreter": TRITON.kernels().INTERPRETING,
        "triton": triton.__version__,
        "torch": torch.__version__,
        "bmt_fast": bmt_fast.__version__,
    }
    utils = TRITON.kernels().utils
    names = {utils.DOT_IEEE: "ieee", utils.DOT_TF32: "tf32", utils.DOT_HALF: "half", utils.DOT_HALF_SPLIT: "split"}
    rows = []
    for op, algorithm, n, d, data in cases:
        for dtype, dot, allow_tf32 in MODES:
            if not selected(data, dtype, args.dtype):
                continue
            dot = names[utils.dot_mode(dtype, allow_tf32)]  # (the mode that runs: bf16's default is one product)
            error, torch_error = measure(op, algorithm, n, d, data, dtype, allow_tf32, args.seeds, device)
            row = {"op": op, "algorithm": algorithm, "n": n, "d": d, "dtype": str(dtype).removeprefix("torch."),
                   "dot": dot, "seeds": args.seeds, "max_rel_error": f"{error:.3e}",
                   "torch_same_dtype_error": f"{torch_error:.3e}", **common, "data": data}
            rows.append(row)
            print(f"{op:17s} {algorithm:6s} {data:8s} {row['dtype']:9s} {dot:6s} {error:.3e}  (torch {torch_error:.3e})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "interpreter" if common["interpreter"] else torch.cuda.get_device_name(device).replace(" ", "_")
    path = args.out or RESULTS / f"triton_precision_{tag}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != fields:  # an older file without the data column: its rows were gaussian
                old = [{**row, "data": row.get("data") or "gaussian"} for row in reader]
                with path.open("w", newline="") as out:
                    writer = csv.DictWriter(out, fieldnames=fields)
                    writer.writeheader()
                    writer.writerows({k: row.get(k, "") for k in fields} for row in old)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return rows


if __name__ == "__main__":
    main()
