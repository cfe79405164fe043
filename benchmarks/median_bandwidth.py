"""median_bandwidth benchmark: H = median of all n² squared distances / log(n + 1) (the median rule).

    python -m benchmarks.median_bandwidth --quick
    python -m benchmarks.median_bandwidth

Nominal work: 2 n² d FLOPs (one pass of distances; selecting the median exactly without storing n²
values takes bmt_fast's CPU kernel two or three such passes). Bytes: read x once. The GEMM limit is one
pass of torch.mm(x_b, x^T) over blocks of rows.
"""

from __future__ import annotations

import torch

from bmt_fast import reference
from benchmarks import harness
from benchmarks.harness import Case, Inputs, grid, trim
from benchmarks.svgd_step import limit_block

DIMS = (3, 16, 64, 128, 768)
MANY_N = (256, 1024, 4096, 16384, 65536)
FEW = grid((4, 16, 64), (76_800, 409_600))
KEY = [Case(65536, 16)]  # naive torch and scipy would need tens of GB here
CPU_MAX_FLOPS = 1.5e11
GPU_MAX_FLOPS = 1e14


def flops(n: int, d: int) -> float:
    return 2.0 * n * n * d


def bytes_moved(n: int, d: int, elem_bytes: int) -> float:
    return float(n * d * elem_bytes)


def gemm_limit(inp: Inputs):
    x = inp.x
    n = x.shape[0]
    block = limit_block(n, x.element_size())
    s = torch.empty(block, n, dtype=x.dtype, device=x.device)

    def run():
        for i in range(0, n, block):
            b = min(block, n - i)
            torch.mm(x[i : i + b], x.T, out=s[:b])
        return s

    return run


def sweep(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [Case(256, 16), Case(1024, 64), Case(16, 76_800)]
    cap = CPU_MAX_FLOPS if device.type == "cpu" else GPU_MAX_FLOPS
    return trim(grid(MANY_N, DIMS), flops, cap, KEY) + FEW


SPEC = harness.OpSpec(
    name="median_bandwidth",
    flops=flops,
    bytes_moved=bytes_moved,
    gemm_limit=gemm_limit,
    reference=lambda inp: reference.median_bandwidth(inp.x),
    sweep=sweep,
    description=__doc__.splitlines()[0],
)


def main(argv: list[str] | None = None) -> list[dict]:
    return harness.main(SPEC, argv)


if __name__ == "__main__":
    main()
