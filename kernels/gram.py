"""Regime "few particles, huge d": the n x n squared distances from a split-K Gram matrix over d.

Each program computes one tile of the upper triangle of xc @ xc.T over one range of columns of x (split-K),
so d = 10^6 still fills the GPU; the ranges are summed afterwards. Each BLOCK_D chunk is a fp32 tl.dot,
added into a float64 tile: d ~ 10^6 terms would otherwise lose ~sqrt(d / BLOCK_D) ulps to the running
sum, and the regime is memory-bound, so the fp64 adds cost nothing measurable.
"""

import torch
import triton
import triton.language as tl

from .tiles import dot_acc, dot_operand, load_centred
from .utils import TileConfig, accumulation_dtype, num_programs_target, tl_dtype, tunable

BLOCK_D = 64


@triton.jit
def _gram_kernel(
    x_ptr,
    shift_ptr,
    out_ptr,
    n,
    d,
    stride_x,
    cols_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    MODE: tl.constexpr,
):
    """out[split, rows, cols] = xc[rows, split's columns] @ xc[cols, split's columns].T (upper tiles only)."""
    tile_i = tl.program_id(0)
    tile_j = tl.program_id(1)
    split = tl.program_id(2)
    if tile_i * BLOCK_M < (tile_j + 1) * BLOCK_N:  # tiles touching the upper triangle; the rest by symmetry
        rows = tile_i * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tile_j * BLOCK_N + tl.arange(0, BLOCK_N)
        k_start = split * cols_per_split
        k_end = tl.minimum(d, k_start + cols_per_split)
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
        for k0 in range(k_start, k_end, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            a = dot_operand(load_centred(x_ptr, shift_ptr, rows, ks, n, k_end, stride_x, ACC), MODE)
            b = dot_operand(load_centred(x_ptr, shift_ptr, cols, ks, n, k_end, stride_x, ACC), MODE)
            chunk = dot_acc(a, tl.trans(b), tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), MODE)
            total += chunk.to(tl.float64)
        mask = (rows < n)[:, None] & (cols < n)[None, :]
        tl.store(out_ptr + split * n * n + rows[:, None] * n + cols[None, :], total, mask=mask)


@triton.jit
def _gram_dists_kernel(gram_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out (n, n) float64 = max(G_ii + G_jj - 2 G_ij, 0), 0 on the diagonal, from the upper triangle
    (i <= j) of G (n, n), which alone _gram_kernel writes."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n
    col_ok = cols < n
    mask = row_ok[:, None] & col_ok[None, :]
    lo = tl.minimum(rows[:, None], cols[None, :])
    hi = tl.maximum(rows[:, None], cols[None, :])
    g = tl.load(gram_ptr + lo * n + hi, mask=mask, other=0.0)
    g_ii = tl.load(gram_ptr + rows * (n + 1), mask=row_ok, other=0.0)
    g_jj = tl.load(gram_ptr + cols * (n + 1), mask=col_ok, other=0.0)
    dist = tl.maximum(g_ii[:, None] + g_jj[None, :] - 2.0 * g, 0.0)
    dist = tl.where(rows[:, None] == cols[None, :], 0.0, dist)
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], dist, mask=mask)


# Tile of _gram_dists_kernel (n <= GRAM_MAX_PARTICLES = 256: at most 16 programs).
DISTS_BLOCK = 64


_GRAM = tunable(
    _gram_kernel,
    key=["n", "d"],
    tiles=[TileConfig(32, 32, 4, 2), TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 3), TileConfig(128, 128, 8, 2)],
)


def gram_splits(n: int, d: int, device: torch.device, tile: TileConfig) -> int:
    """Column ranges for split-K: enough programs for the device, at least 4 chunks of BLOCK_D each."""
    tiles = triton.cdiv(n, tile.block_m) * (triton.cdiv(n, tile.block_m) + 1) // 2
    return max(1, min(num_programs_target(device) // tiles, triton.cdiv(d, 4 * BLOCK_D)))


def gram_sq_dists(
    x: torch.Tensor, shift: torch.Tensor, mode: int, *, splits: int | None = None, tile: TileConfig | None = None
) -> torch.Tensor:
    """All n x n squared distances (float64, exact zero diagonal) of contiguous rows x (n, d)."""
    n, d = x.shape
    acc = accumulation_dtype(x.dtype)
    nominal = tile or _GRAM.fixed
    if splits is None:
        splits = gram_splits(n, d, x.device, nominal)
    cols_per_split = triton.cdiv(triton.cdiv(d, splits), BLOCK_D) * BLOCK_D
    splits = triton.cdiv(d, cols_per_split)
    partial = torch.empty((splits, n, n), dtype=torch.float64, device=x.device)  # only i <= j is read
    _GRAM.launch(
        lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), splits),
        tile=tile,
        x_ptr=x,
        shift_ptr=shift,
        out_ptr=partial,
        n=n,
        d=d,
        stride_x=x.stride(0),
        cols_per_split=cols_per_split,
        BLOCK_D=BLOCK_D,
        ACC=tl_dtype(acc),
        MODE=mode,
    )
    # The splits are summed by torch (one parallel reduction; summed in one program they were a serial loop
    # of hundreds of iterations on a GPU: 4 per SM), then one launch makes the distances (what were a dozen
    # small torch ops: triu, transpose, norms, clamp, diagonal).
    gram = partial[0] if splits == 1 else partial.sum(0)
    dist = torch.empty((n, n), dtype=torch.float64, device=x.device)
    grid = (triton.cdiv(n, DISTS_BLOCK), triton.cdiv(n, DISTS_BLOCK))
    _gram_dists_kernel[grid](gram, dist, n, BLOCK=DISTS_BLOCK)
    return dist

