"""svgd_step benchmark: phi for n particles in d dimensions, fixed bandwidth H.

    python -m benchmarks.svgd_step --quick
    python -m benchmarks.svgd_step                          # full sweep for the device
    python -m benchmarks.svgd_step --sizes 8192x128,65536x64,16x409600
    python -m benchmarks.svgd_step --data clusters --dtype bfloat16 --sizes 65536x128

`--data clusters`: two clusters 0.05 wide whose centres are drawn N(0, 10²) per feature, H the mean squared
distance within a cluster (2 · 0.05² · d): particles spread far beyond the kernel's width, where the bf16
GPU kernels take their split form (README "GPU precision"); the default, standard-normal particles with H
from `harness.bandwidth_for`, takes their folded form. Run both to time the one against the other.

Nominal work: 6 n² d FLOPs (2 n² d for the distances, 4 n² d for K @ [score | x]); achieved FLOP/s are
computed from it whatever a provider actually does (bmt_fast's CPU kernel folds score and x into one
matrix and uses the symmetry of K: 3 n² d, about half; 4 n² d in its fused kernel's rows form, below 2048
particles with up to 24 features and below 1024 with more). Bytes the step must move: read x twice and the scores
once, write phi: 4 n d elements.
"""

from __future__ import annotations

import torch

import dataclasses

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


CLUSTER_WIDTH = 0.05
CLUSTER_SPREAD = 10.0
# Tolerances are this many times the Gaussian data's: distances far below the particles' squared norms put
# fp32 itself 4e-4 - 2e-3 off (torch's own formula up to 5e-3 at 8 x 2048), bf16 within its rounding (README).
CLUSTER_ERROR_SCALE = 64.0


def cluster_bandwidth(case: Case) -> float:
    """The mean squared distance of two particles of one cluster: 2 w² d."""
    return 2.0 * CLUSTER_WIDTH**2 * case.d


def cluster_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """Two clusters CLUSTER_WIDTH wide, centres N(0, CLUSTER_SPREAD²) per feature, alternating rows; scores
    standard normal; H = cluster_bandwidth (far below the squared distance between the clusters)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    centres = torch.randn(2, case.d, generator=generator) * CLUSTER_SPREAD
    x = centres[torch.arange(case.n) % 2] + CLUSTER_WIDTH * torch.randn(case.n, case.d, generator=generator)
    score = torch.randn(case.n, case.d, generator=generator)
    h = cluster_bandwidth(case)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return Inputs(x.to(device=device, dtype=dtype), score.to(device=device, dtype=dtype),
                  torch.tensor(h, dtype=acc, device=device), h)  # fmt: skip


def spec_for(data: str) -> harness.OpSpec:
    if data == "gaussian":
        return SPEC
    return dataclasses.replace(
        SPEC,
        make_inputs=cluster_inputs,
        bandwidth_label=lambda case: f"{cluster_bandwidth(case):.6g}",
        describe=lambda case: f"two clusters {CLUSTER_WIDTH} wide, centres N(0, {CLUSTER_SPREAD:g}^2), H within one",
        error_scale=CLUSTER_ERROR_SCALE,
    )


SPEC = dataclasses.replace(
    SPEC,
    options={"data": dict(choices=["gaussian", "clusters"], default="gaussian",
                          help="the particles (default gaussian; clusters: far apart next to the kernel's width)")},  # fmt: skip
    configure=lambda options: spec_for(options.get("data") or "gaussian"),
)


def main(argv: list[str] | None = None) -> list[dict]:
    return harness.main(SPEC, argv)


if __name__ == "__main__":
    main()
