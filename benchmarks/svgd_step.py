"""svgd_step benchmark: phi for n particles in d dimensions, fixed bandwidth H.

    python -m benchmarks.svgd_step --quick
    python -m benchmarks.svgd_step                          # full sweep for the device
    python -m benchmarks.svgd_step --sizes 8192x128,65536x64,16x409600

Nominal work: 6 n² d FLOPs (2 n² d for the distances, 4 n² d for K @ [score | x]); achieved FLOP/s are
computed from it whatever a provider actually does (bmt_fast's CPU kernel folds score and x into one
matrix and uses the symmetry of K: 3 n² d, about half; 4 n² d in its fused kernel's rows form, below 2048
particles with up to 24 features and below 1024 with more). Bytes the step must move: read x twice and the scores
once, write phi: 4 n d elements.
"""

from __future__ import annotations

import torch

from bmt_fast import reference
from benchmarks import harness
from benchmarks.harness import Case, Inputs, grid, trim

DIMS = (3, 16, 64, 128, 768)
MANY_N = (256, 1024, 4096, 16384, 65536)  # on CPU, n = 65536 fits the FLOP budget at d = 3 only
GPU_EXTRA_N = (131072, 262144)
FEW = grid((4, 16, 64), (76_800, 409_600))  # soft prompts: 100 tokens x 768 (T5-base), 100 x 4096 (7B)
KEY = [Case(8192, 128), Case(65536, 64), Case(16, 409_600)]  # the targets
CPU_MAX_FLOPS = 1.1e11  # the full CPU sweep of all three ops in about 25 minutes on 2 cores
GPU_MAX_FLOPS = 1e14


def flops(n: int, d: int) -> float:
    return 6.0 * n * n * d


def bytes_moved(n: int, d: int, elem_bytes: int) -> float:
    return 4.0 * n * d * elem_bytes


def limit_block(n: int, elem_bytes: int, budget_bytes: int = 256 << 20) -> int:
    """All rows at once while n x n fits in budget_bytes; blocks of rows beyond."""
    return n if n * n * elem_bytes <= budget_bytes else max(64, budget_bytes // (n * elem_bytes) // 64 * 64)


def gemm_limit(inp: Inputs):
    """torch's matmuls doing the 6 n² d FLOPs in the shapes the op needs, block by block of rows:
    S = x_b x^T (2 b n d), then S [score | x] (4 b n d). No exp, no n x n beyond one block."""
    x = inp.x
    n, d = x.shape
    v = torch.cat([inp.score, x], 1)
    block = limit_block(n, x.element_size())
    s = torch.empty(block, n, dtype=x.dtype, device=x.device)
    out = torch.empty(block, 2 * d, dtype=x.dtype, device=x.device)

    def run():
        for i in range(0, n, block):
            b = min(block, n - i)
            torch.mm(x[i : i + b], x.T, out=s[:b])
            torch.mm(s[:b], v, out=out[:b])
        return out

    return run


def sweep(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [Case(256, 16), Case(1024, 64), Case(16, 76_800)]
    if device.type == "cpu":
        return trim(grid(MANY_N, DIMS), flops, CPU_MAX_FLOPS, KEY[:2]) + FEW
    return trim(grid(MANY_N + GPU_EXTRA_N, DIMS), flops, GPU_MAX_FLOPS, KEY[:2]) + FEW


SPEC = harness.OpSpec(
    name="svgd_step",
    flops=flops,
    bytes_moved=bytes_moved,
    gemm_limit=gemm_limit,
    reference=lambda inp: reference.svgd_step(inp.x, inp.score, inp.h),
    sweep=sweep,
    description=__doc__.splitlines()[0],
)


def main(argv: list[str] | None = None) -> list[dict]:
    return harness.main(SPEC, argv)


if __name__ == "__main__":
    main()
