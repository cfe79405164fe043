"""svgd_step_vmap benchmark: B independent particle sets (B, n, d) stepped in one call, fixed bandwidth H.

    python -m benchmarks.svgd_step_vmap --quick
    python -m benchmarks.svgd_step_vmap --batch 64 --sizes 32x8,100x10

How code that runs many SVGD chains at once (one per task, data point or seed) calls the step: bmt_fast's ops
under `torch.func.vmap` (one op call per set inside its vmap rule, each phi written into one batch-first
result), a Python loop over the sets with `torch.stack`, and `torch.func.vmap` of the naive torch code,
which torch batches (one batched cdist, exp and matmul pair over all sets, B n x n matrices in memory).
Work and bytes are B times svgd_step's (6 n² d FLOPs, 4 n d elements per set); the limits are torch's batched
GEMMs (bmm) for those FLOPs and a copy of those bytes. Rows carry n and d of one set; the note says B.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import bmt_fast
from bmt_fast import reference
from benchmarks import harness, providers, svgd_step
from benchmarks.harness import Case, grid, trim
from benchmarks.providers import Provider

NAME = "svgd_step_vmap"
DEFAULT_BATCH = 16
CPU_MAX_FLOPS = 2e10  # the batch's FLOPs: the full CPU sweep in a few minutes on 2 cores


@dataclass
class BatchedInputs:
    """B sets of particles and scores (B, n, d) and one fixed bandwidth H for all."""

    xs: torch.Tensor
    scores: torch.Tensor
    h: torch.Tensor
    h_float: float

    @property
    def x(self) -> torch.Tensor:
        """One set (n, d): the harness sizes its copy limit by it (times B, by bytes_moved)."""
        return self.xs[0]

    def float64(self) -> "BatchedInputs":
        return BatchedInputs(self.xs.double(), self.scores.double(), self.h.double(), self.h_float)


def make_inputs(batch: int, case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> BatchedInputs:
    one = harness.Inputs.make(Case(batch * case.n, case.d), dtype, device, seed)
    h = harness.bandwidth_for(case)
    shape = (batch, case.n, case.d)
    return BatchedInputs(one.x.reshape(shape), one.score.reshape(shape), torch.tensor(h, dtype=one.h.dtype, device=device), h)


def gemm_limit(inp: BatchedInputs):
    """torch's batched matmuls for the batch's 6 B n² d FLOPs: S = x x^T (2 B n² d), then S [score | x]."""
    x = inp.xs
    b, n, d = x.shape
    v = torch.cat([inp.scores, x], 2)
    s = torch.empty(b, n, n, dtype=x.dtype, device=x.device)
    out = torch.empty(b, n, 2 * d, dtype=x.dtype, device=x.device)
    return lambda: torch.bmm(torch.bmm(x, x.transpose(1, 2), out=s), v, out=out)


def batch_reference(inp: BatchedInputs) -> torch.Tensor:
    return torch.stack([reference.svgd_step(x, s, inp.h) for x, s in zip(inp.xs, inp.scores)])


def vmap_provider(backend: str) -> Provider:
    def build(inp: BatchedInputs):
        step = torch.func.vmap(lambda x, s: bmt_fast.svgd_step(x, s, inp.h, backend=backend, check_inputs=False))
        return lambda: step(inp.xs, inp.scores)

    return dataclasses.replace(
        next(p for p in providers.bmt_fast_providers("svgd_step") if p.name == f"bmt_fast-{backend}"),
        name=f"bmt_fast-{backend}-vmap", build=build,
    )  # fmt: skip


def loop_provider(backend: str) -> Provider:
    def build(inp: BatchedInputs):
        h = inp.h
        return lambda: torch.stack(
            [bmt_fast.svgd_step(x, s, h, backend=backend, check_inputs=False) for x, s in zip(inp.xs, inp.scores)]
        )

    return dataclasses.replace(vmap_provider(backend), name=f"bmt_fast-{backend}-loop", build=build)


def batch_providers(batch: int) -> list[Provider]:
    naive = torch.func.vmap(providers.svgd_naive, in_dims=(0, 0, None))
    return [
        Provider("torch-naive-vmap", lambda inp: lambda: naive(inp.xs, inp.scores, inp.h),
                 extra_memory=lambda n, d, e: 3.0 * batch * n * n * e),
        *[provider(name) for name in ("cpu", "cuda", "triton") for provider in (vmap_provider, loop_provider)],
    ]  # fmt: skip


def spec_for(batch: int) -> harness.OpSpec:
    if batch < 1:
        raise SystemExit(f"--batch must be at least 1, got {batch}")
    providers.register(NAME, lambda: batch_providers(batch))

    def sweep(device: torch.device, quick: bool) -> list[Case]:
        if quick:
            return [Case(32, 8), Case(256, 64), Case(16, 76_800)]
        budget = CPU_MAX_FLOPS if device.type == "cpu" else svgd_step.GPU_MAX_FLOPS
        return trim(grid((32, 128, 512, 2048), (8, 64, 768)), lambda n, d: batch * svgd_step.flops(n, d), budget, []) + [
            Case(4, 76_800), Case(16, 76_800)
        ]

    return harness.OpSpec(
        name=NAME,
        flops=lambda n, d: batch * svgd_step.flops(n, d),
        bytes_moved=lambda n, d, e: batch * svgd_step.bytes_moved(n, d, e),
        gemm_limit=gemm_limit,
        reference=batch_reference,
        sweep=sweep,
        description=__doc__.splitlines()[0],
        make_inputs=lambda case, dtype, device, seed=0: make_inputs(batch, case, dtype, device, seed),
        check_cases=((40, 5), (4, 3000)),
        describe=lambda case: f"a batch of {batch} particle sets of n x d",
        options={"batch": dict(type=harness.positive(int), default=DEFAULT_BATCH,
                               help=f"particle sets per call (default {DEFAULT_BATCH})")},  # fmt: skip
        configure=lambda options: spec_for(options["batch"] if options.get("batch") is not None else DEFAULT_BATCH),
    )


SPEC = spec_for(DEFAULT_BATCH)


def main(argv: list[str] | None = None) -> list[dict]:
    return harness.main(SPEC, argv)


if __name__ == "__main__":
    main()
