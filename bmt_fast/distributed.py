"""SVGD over particles split across the ranks of a process group.

Each rank holds a slice of the particles. The step all-gathers the particles and scores (sizes may differ
between ranks), agrees on one bandwidth and one centring shift, and computes phi for its own rows only:

    phi_r = (1/N) [ K_rA (score_A - (2/H) xc_A) + (2/H) rowsum(K_rA) xc_r ]

with K_rA streamed in (row block x column block) pieces through the backend's `rbf_kernel`, so no rank
holds more than one block of the kernel matrix. The result equals `svgd_step` on the concatenated particles.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import backends
from .ops import median_bandwidth as _median_bandwidth

# Rows x columns of one kernel block: 4096 x 8192 fp32 = 128 MiB.
ROW_BLOCK = 4096
COLUMN_BLOCK = 8192
# Up to this many particles the median bandwidth is exact; beyond it is sampled (see median_bandwidth).
EXACT_MEDIAN_MAX_PARTICLES = 65536


def all_gather_rows(t: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's rows of t (rank order); also return each rank's row count."""
    world = dist.get_world_size(group)
    count = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(pieces, sizes)]), sizes


def shared_bandwidth(x_all: torch.Tensor, bandwidth: torch.Tensor | None, group, backend: str) -> torch.Tensor:
    """The bandwidth every rank uses: the given one, or the median rule computed on the group's first rank
    (exact up to EXACT_MEDIAN_MAX_PARTICLES particles, sampled beyond) and broadcast."""
    if bandwidth is not None:
        return bandwidth.to(device=x_all.device, dtype=torch.float64).reshape(())
    h = torch.zeros((), dtype=torch.float64, device=x_all.device)
    if dist.get_rank(group) == 0:
        method = "exact" if x_all.shape[0] <= EXACT_MEDIAN_MAX_PARTICLES else "sampled"
        generator = None if method == "exact" else torch.Generator(device="cpu").manual_seed(0)
        h.fill_(float(_median_bandwidth(x_all, method=method, generator=generator, backend=backend, check_inputs=False)))
    dist.broadcast(h, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return h


def svgd_step_local_rows(
    x_all: torch.Tensor, score_all: torch.Tensor, rows: slice, h: torch.Tensor, backend: str
) -> torch.Tensor:
    """phi for x_all[rows] against every particle, computed block by block (fp32/fp64 accumulation)."""
    from .reference import accumulation_dtype, centre

    dtype = accumulation_dtype(x_all.dtype)
    (xc,) = centre(x_all.to(dtype))  # one shift for all ranks: they all hold the same x_all
    a = 2.0 / float(h)
    weights = torch.cat([score_all.to(dtype) - a * xc, torch.ones_like(xc[:, :1])], dim=1)
    chosen = backends.select(backend, "rbf_kernel", x_all)
    local = xc[rows]
    phi = torch.empty_like(local)
    for r0 in range(0, local.shape[0], ROW_BLOCK):
        block = local[r0 : r0 + ROW_BLOCK]
        acc = torch.zeros((block.shape[0], weights.shape[1]), dtype=dtype, device=x_all.device)
        for c0 in range(0, xc.shape[0], COLUMN_BLOCK):
            k = chosen.rbf_kernel(block, xc[c0 : c0 + COLUMN_BLOCK], h.to(dtype))
            acc.addmm_(k.to(dtype), weights[c0 : c0 + COLUMN_BLOCK])
        phi[r0 : r0 + block.shape[0]] = acc[:, :-1] + a * acc[:, -1:] * block
    return (phi / x_all.shape[0]).to(x_all.dtype)


def svgd_step(
    x_local: torch.Tensor, score_local: torch.Tensor, bandwidth: torch.Tensor | None, *, group, backend: str
) -> torch.Tensor:
    """phi for this rank's particles (validated 2-D inputs; bandwidth None means the median rule)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("svgd_step(group=...) needs an initialised torch.distributed process group")
    x_all, sizes = all_gather_rows(x_local, group)
    score_all, _ = all_gather_rows(score_local, group)
    start = sum(sizes[: dist.get_rank(group)])
    h = shared_bandwidth(x_all, bandwidth, group, backend)
    return svgd_step_local_rows(x_all, score_all, slice(start, start + x_local.shape[0]), h, backend)
