"""rbf_kernel benchmark: the n x n matrix K_ij = exp(-|x_i - x_j|² / H) (forward), fixed bandwidth H.

    python -m benchmarks.rbf_kernel --quick
    python -m benchmarks.rbf_kernel

Nominal work: 2 n² d FLOPs for the distances (the n² exponentials are not counted). Bytes: read x, write
the n² outputs. The GEMM limit is torch.mm(x, x^T) into a preallocated n x n matrix: the distance GEMM and
the output write, without the exponentials.
"""

from __future__ import annotations

import torch

from bmt_fast import reference
from benchmarks import harness
from benchmarks.harness import Case, Inputs, grid, trim

DIMS = (3, 16, 64, 128, 768)
MANY_N = (256, 1024, 4096, 16384)
GPU_EXTRA_N = (32768,)
FEW = grid((4, 16, 64), (76_800, 409_600))
CPU_MAX_FLOPS = 1.5e11
GPU_MAX_FLOPS = 1e14


def flops(n: int, d: int) -> float:
    return 2.0 * n * n * d


def bytes_moved(n: int, d: int, elem_bytes: int) -> float:
    return (n * d + n * n) * float(elem_bytes)


def gemm_limit(inp: Inputs):
    x = inp.x
    out = torch.empty(x.shape[0], x.shape[0], dtype=x.dtype, device=x.device)
    return lambda: torch.mm(x, x.T, out=out)


def sweep(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [Case(256, 16), Case(1024, 64), Case(16, 76_800)]
    if device.type == "cpu":
        return trim(grid(MANY_N, DIMS), flops, CPU_MAX_FLOPS, []) + FEW
    return trim(grid(MANY_N + GPU_EXTRA_N, DIMS), flops, GPU_MAX_FLOPS, []) + FEW


SPEC = harness.OpSpec(
    name="rbf_kernel",
    flops=flops,
    bytes_moved=bytes_moved,
    gemm_limit=gemm_limit,
    reference=lambda inp: reference.rbf_kernel(inp.x, None, inp.h),
    sweep=sweep,
    description=__doc__.splitlines()[0],
)


def main(argv: list[str] | None = None) -> list[dict]:
    return harness.main(SPEC, argv)


if __name__ == "__main__":
    main()
