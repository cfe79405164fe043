"""rbf_kernel_grad benchmark: the gradient in x of sum_ij K(x, x)_ij by autograd through the kernel, fixed H.

    python -m benchmarks.rbf_kernel_grad --quick
    python -m benchmarks.rbf_kernel_grad --dtype bfloat16 --sizes 256x76800

What code that differentiates the kernel by autograd runs (kernel-sum losses such as MMD; SVGD's repulsion
sum_j grad_{x_j} k(x_j, x_i) is minus half of this gradient): the forward, then the backward in x. Nominal
work: 4 n² d FLOPs (the forward's distance GEMM, and the n x n weights times x in the backward). Bytes:
read x twice, write its gradient, write and read the n² kernel values: (3 n d + 2 n²) elements. The GEMM
limit is torch's two GEMMs for those FLOPs: x x^T into an n x n matrix, then that matrix times x.
"""

from __future__ import annotations

from typing import Callable

import torch

from bmt_fast import reference
from benchmarks import harness, providers
from benchmarks.harness import Case, Inputs, grid, trim
from benchmarks.providers import Provider

NAME = "rbf_kernel_grad"
DIMS = (3, 16, 64, 128, 768)
MANY_N = (256, 1024, 4096)
FEW = grid((4, 16, 64, 256), (76_800, 409_600))
CPU_MAX_FLOPS = 1.5e11


def flops(n: int, d: int) -> float:
    return 4.0 * n * n * d


def bytes_moved(n: int, d: int, elem_bytes: int) -> float:
    return (3.0 * n * d + 2.0 * n * n) * elem_bytes


def gemm_limit(inp: Inputs):
    x = inp.x
    gram = torch.empty(x.shape[0], x.shape[0], dtype=x.dtype, device=x.device)
    out = torch.empty_like(x)
    return lambda: torch.mm(torch.mm(x, x.T, out=gram), x, out=out)


def kernel_sum_gradient(kernel: Callable, inp: Inputs) -> torch.Tensor:
    """d/dx of sum_ij kernel(x, None, H)_ij (x on both sides of the kernel)."""
    x = inp.x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(kernel(x, None, inp.h).sum(), x)
    return grad


def naive_kernel(a: torch.Tensor, b: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    return torch.exp(-torch.cdist(a, a if b is None else b, compute_mode=providers.CDIST_MODE).square() / h)


def gradient_providers() -> list[Provider]:
    # autograd keeps cdist's and exp's n x n results and forms as many in the backward
    return providers.autograd_providers(NAME, kernel_sum_gradient, naive_kernel,
                                        extra_memory=lambda n, d, e: 6.0 * n * n * max(e, 4), compile_rtol=2e-4)


def sweep(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [Case(256, 16), Case(1024, 64), Case(16, 76_800)]
    return trim(grid(MANY_N, DIMS), flops, CPU_MAX_FLOPS if device.type == "cpu" else float("inf"), []) + FEW


providers.register(NAME, gradient_providers)
SPEC = harness.OpSpec(
    name=NAME,
    flops=flops,
    bytes_moved=bytes_moved,
    gemm_limit=gemm_limit,
    reference=lambda inp: kernel_sum_gradient(reference.rbf_kernel, inp),
    sweep=sweep,
    description=__doc__.splitlines()[0],
)


def main(argv: list[str] | None = None) -> list[dict]:
    return harness.main(SPEC, argv)


if __name__ == "__main__":
    main()
