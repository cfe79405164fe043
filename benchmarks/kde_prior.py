"""kde_prior benchmark: the target stage's prior -log mean_m k(theta, theta_m) and its gradient in theta.

    python -m benchmarks.kde_prior --quick
    python -m benchmarks.kde_prior --dtype float64    # the precision the trainer computes it in

One soft prompt theta (1 x d) against M = n fixed source particles (n x d), a fixed bandwidth H: the
forward (rbf_kernel of two sets) and the backward in theta, as `bmt_fast.transfer.target.KDEPrior` runs it
once per target-stage step. Nominal work: 2 n d FLOPs (the n distances). Bytes: read the particles and
theta, write theta's gradient: (n + 2) d elements. The GEMM limit is torch.mv of the particles with theta.
"""

from __future__ import annotations

from typing import Callable

import torch

from bmt_fast import reference
from benchmarks import harness, providers
from benchmarks.harness import Case, Inputs, grid
from benchmarks.providers import Provider

NAME = "kde_prior"
PARTICLES = (4, 16, 64)
DIMS = (76_800, 409_600)  # prompt length x hidden size: T5-base (100 x 768), a 7B model (100 x 4096)


def flops(n: int, d: int) -> float:
    return 2.0 * n * d


def bytes_moved(n: int, d: int, elem_bytes: int) -> float:
    return (n + 2) * d * float(elem_bytes)


def gemm_limit(inp: Inputs):
    theta = inp.score[0]
    return lambda: torch.mv(inp.x, theta)


def prior_gradient(kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], inp: Inputs) -> torch.Tensor:
    """d/dtheta of -log mean_m kernel(theta, particles, H) with theta = the first score row (a standard
    normal draw, so the n kernel values sit near 1 / (n + 1) at the benchmark's H)."""
    theta = inp.score[:1].detach().requires_grad_(True)
    loss = -torch.log(kernel(theta, inp.x, inp.h).mean())
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


def naive_kernel(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    # (cdist by matmul: its direct kernels have no bf16 / fp16 version, which every such row had failed on)
    return torch.exp(-torch.cdist(a, b, compute_mode=providers.CDIST_MODE).square() / h)


def prior_providers() -> list[Provider]:
    # Naive autograd keeps cdist's and exp's n-value results and theta's d-vector gradients: no n x d
    # temporaries beyond cdist's internal difference buffer on some paths.
    return providers.autograd_providers(NAME, prior_gradient, naive_kernel,
                                        extra_memory=lambda n, d, e: 2.0 * (n + 1) * d * max(e, 4))


def sweep(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [Case(16, 76_800)]
    return grid(PARTICLES, DIMS)


providers.register(NAME, prior_providers)
SPEC = harness.OpSpec(
    name=NAME,
    flops=flops,
    bytes_moved=bytes_moved,
    gemm_limit=gemm_limit,
    reference=lambda inp: prior_gradient(reference.rbf_kernel, inp),
    sweep=sweep,
    description=__doc__.splitlines()[0],
    check_cases=((5, 5000),),
    time_exponent=1.0,
)


def main(argv: list[str] | None = None) -> list[dict]:
    return harness.main(SPEC, argv)


if __name__ == "__main__":
    main()
