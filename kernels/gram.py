"""Regime "few particles, huge d": the n x n squared distances from a split-K Gram matrix over d.

Each program computes one tile of the upper triangle of xc @ xc.T over one range of columns of x (split-K),
so d = 10^6 still fills the GPU; the ranges are summed afterwards. Each BLOCK_D chunk is a fp32 tl.dot,
added into a float64 tile: d ~ 10^6 terms would otherwise lose ~sqrt(d / BLOCK_D) ulps to the running
sum, and the regime is memory-bound, so the fp64 adds cost nothing measurable.
"""

import torch
import triton
import triton.language as tl

from .centring import SHIFT, centring
from .tiles import dot_acc, dot_operand, load_bandwidth, load_centred, to_output
from .utils import INTERPRETING, SMALL_TILES, TileConfig, accumulation_dtype, cdiv, num_programs_target, tl_dtype, tunable

BLOCK_D = 64


@triton.jit
def _load_rows(x_ptr, y_ptr, n_x, shift_ptr, rows, cols, n, n_cols, stride_x, stride_y, ACC: tl.constexpr,
               TWO_SETS: tl.constexpr):  # fmt: skip
    """Rows of the Gram kernel's set, centred: x's, then (TWO_SETS) y's rows as rows n_x .. n - 1."""
    if TWO_SETS:
        col_ok = cols < n_cols
        in_x = rows < n_x
        in_y = (rows >= n_x) & (rows < n)
        from_x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=in_x[:, None] & col_ok[None, :], other=0.0)
        from_y = tl.load(y_ptr + (rows - n_x)[:, None] * stride_y + cols[None, :], mask=in_y[:, None] & col_ok[None, :],
                         other=0.0)  # fmt: skip
        shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
        mask = (rows < n)[:, None] & col_ok[None, :]
        return tl.where(mask, tl.where(in_x[:, None], from_x, from_y).to(ACC) - shift[None, :], 0.0)
    return load_centred(x_ptr, shift_ptr, rows, cols, n, n_cols, stride_x, ACC)


@triton.jit
def _gram_kernel(
    x_ptr,
    y_ptr,
    shift_ptr,
    out_ptr,
    n,
    n_x,
    d,
    stride_x,
    stride_y,
    cols_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    MODE: tl.constexpr,
    TWO_SETS: tl.constexpr,
):
    """out[split, rows, cols] = xc[rows, split's columns] @ xc[cols, split's columns].T (upper tiles only).

    TWO_SETS: the set is x's n_x rows, then y's n - n_x (rbf_kernel(x, y) of few rows); else x's n rows."""
    tile_i = tl.program_id(0)
    tile_j = tl.program_id(1)
    split = tl.program_id(2)
    if tile_i * BLOCK_M < (tile_j + 1) * BLOCK_N:  # tiles touching the upper triangle; the rest by symmetry
        rows = tile_i * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tile_j * BLOCK_N + tl.arange(0, BLOCK_N)
        k_start = split * cols_per_split
        k_end = tl.minimum(d, k_start + cols_per_split)
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
        # A diagonal tile (the only one for n <= BLOCK_M: the prompt regime) multiplies its rows by
        # themselves: loaded once.
        same = BLOCK_M == BLOCK_N and tile_i == tile_j
        for k0 in range(k_start, k_end, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            centred = _load_rows(x_ptr, y_ptr, n_x, shift_ptr, rows, ks, n, k_end, stride_x, stride_y, ACC, TWO_SETS)
            a = dot_operand(centred, MODE)
            if same:
                b = a
            else:
                b = dot_operand(_load_rows(x_ptr, y_ptr, n_x, shift_ptr, cols, ks, n, k_end, stride_x, stride_y, ACC, TWO_SETS),
                                MODE)  # fmt: skip
            chunk = dot_acc(a, tl.trans(b), tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), MODE)
            total += chunk.to(tl.float64)
        mask = (rows < n)[:, None] & (cols < n)[None, :]
        tl.store(out_ptr + split * n * n + rows[:, None] * n + cols[None, :], total, mask=mask)


@triton.jit
def _gram_dists_kernel(gram_ptr, out_ptr, h_ptr, n, n_rows, n_cols, col0, KERNEL: tl.constexpr, ACC: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    """out (n_rows, n_cols) = the squared distances of rows [0, n_rows) to rows [col0, col0 + n_cols) of the
    set, or with KERNEL exp(-distance / H) (H read as load_bandwidth reads it, in ACC; out in its own dtype):
    rbf_kernel's K from the Gram pass in this one launch. A distance is max(G_ii + G_jj - 2 G_ij, 0), 0 on
    the diagonal, in float64, from the upper triangle
    (i <= j) of G (n, n), which alone _gram_kernel writes; NaN in row and column i (its diagonal too) where
    G_ii is not finite: a NaN or an infinity in particle i makes its G_ii NaN or infinite (every particle's
    where the shift, the columns' mean, carries it), so the median (gram_median) and the entries of K of its pairs are NaN, as the reference's. Told from the
    diagonal, not left to the arithmetic: a GPU's max returns the number beside a NaN."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    out_cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cols = col0 + out_cols
    row_ok = rows < n_rows
    col_ok = out_cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    lo = tl.minimum(rows[:, None], cols[None, :])
    hi = tl.maximum(rows[:, None], cols[None, :])
    g = tl.load(gram_ptr + lo * n + hi, mask=mask, other=0.0)
    g_ii = tl.load(gram_ptr + rows * (n + 1), mask=row_ok, other=0.0)
    g_jj = tl.load(gram_ptr + cols * (n + 1), mask=col_ok, other=0.0)
    dist = tl.maximum(g_ii[:, None] + g_jj[None, :] - 2.0 * g, 0.0)
    dist = tl.where(rows[:, None] == cols[None, :], 0.0, dist)
    finite = (tl.abs(g_ii) < float("inf"))[:, None] & (tl.abs(g_jj) < float("inf"))[None, :]
    value = tl.where(finite, dist, float("nan"))
    if KERNEL:
        value = tl.exp(value * (-1.0 / load_bandwidth(h_ptr, ACC).to(tl.float64)))
    # (through ACC: a float64 NaN narrowed straight to bf16 became 0 in Triton's interpreter)
    value = to_output(value.to(ACC), out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * n_cols + out_cols[None, :], value, mask=mask)


@triton.jit
def _rank_select_kernel(values_ptr, out_ptr, m, k_lo, k_hi, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[0] = the value of rank k_lo, out[1] that of rank k_hi among values[0:m] (ascending), found by
    counting: candidate c holds the ranks [#{v < c}, #{v <= c}). Each program tests BLOCK_C candidates
    against all m values; tied candidates store the same value. out[2] = NaN if a value is NaN (out
    zeroed before)."""
    cand = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cand < m
    c = tl.load(values_ptr + cand, mask=c_ok, other=0.0)
    below = tl.zeros((BLOCK_C,), dtype=tl.int32)
    up_to = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for e0 in range(0, m, BLOCK_E):
        idx = e0 + tl.arange(0, BLOCK_E)
        e_ok = idx < m
        v = tl.load(values_ptr + idx, mask=e_ok, other=0.0)
        below += tl.sum((e_ok[None, :] & (v[None, :] < c[:, None])).to(tl.int32), axis=1)
        up_to += tl.sum((e_ok[None, :] & (v[None, :] <= c[:, None])).to(tl.int32), axis=1)
    zeros = tl.zeros((BLOCK_C,), dtype=tl.int32)
    tl.store(out_ptr + zeros, c, mask=c_ok & (below <= k_lo) & (k_lo < up_to))
    tl.store(out_ptr + 1 + zeros, c, mask=c_ok & (below <= k_hi) & (k_hi < up_to))
    tl.store(out_ptr + 2 + zeros, c, mask=c_ok & (c != c))


@triton.jit
def _median_of_ranks_kernel(ranks_ptr, out_ptr):
    """out = the mean of the two middle values (numpy.median's convention), NaN if any value was."""
    lower = tl.load(ranks_ptr)
    upper = tl.load(ranks_ptr + 1)
    tl.store(out_ptr, 0.5 * (lower + upper) + tl.load(ranks_ptr + 2))


# Candidates per program and values per step of _rank_select_kernel: a 64 x 256 comparison tile on a GPU;
# in the interpreter, whose cost is per program and step (numpy runs each step), 1024 x 1024.
RANK_BLOCKS_GPU = {"BLOCK_C": 64, "BLOCK_E": 256}
RANK_BLOCKS = {"BLOCK_C": 1024, "BLOCK_E": 1024} if INTERPRETING else RANK_BLOCKS_GPU


def gram_median(dist: torch.Tensor) -> torch.Tensor:
    """numpy.median of all n*n entries of dist (float64) as a float64 0-dim tensor, on the device in three
    launches (a memset and two kernels) instead of about a dozen torch ops; n^4 comparisons, which for the
    Gram path's n <= 256 is at most 4.3e9."""
    m = dist.numel()
    ranks = torch.zeros(3, dtype=torch.float64, device=dist.device)
    _rank_select_kernel[(cdiv(m, RANK_BLOCKS["BLOCK_C"]),)](dist, ranks, m, (m - 1) // 2, m // 2, **RANK_BLOCKS)
    median = torch.empty((), dtype=torch.float64, device=dist.device)
    _median_of_ranks_kernel[(1,)](ranks, median)
    return median


# Tile of _gram_dists_kernel (n <= GRAM_MAX_PARTICLES = 256: at most 16 programs).
DISTS_BLOCK = 64


# Candidates of the split-K Gram kernel (square tiles); 16 x 16 holds a prompt's 16 particles without padding
# rows: a quarter of the 32 x 32 tile's products.
_GRAM_TILES = [*SMALL_TILES, TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 3), TileConfig(128, 128, 8, 2)]
_GRAM = tunable(_gram_kernel, key=["n", "d"], tiles=_GRAM_TILES)


def gram_splits(n: int, d: int, device: torch.device, tile: TileConfig) -> int:
    """Column ranges for split-K: enough programs for the device, at least 4 chunks of BLOCK_D each."""
    tiles = cdiv(n, tile.block_m) * (cdiv(n, tile.block_m) + 1) // 2
    return max(1, min(num_programs_target(device) // tiles, cdiv(d, 4 * BLOCK_D)))


def gram_centring_and_sq_dists(
    x: torch.Tensor, mode: int, *, splits: int | None = None, tile: TileConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(centring, gram_sq_dists) of contiguous rows x (n, d): the centring pass (kernels/centring.py), then
    the Gram of the rows shifted by its SHIFT row. (Until 2026-12-06, up to 16 particles the Gram kernel took
    x[0] as the shift and wrote the centring shift as it went, saving that pass: with x[0] far from a tight
    group of the others, fp32 cancellation in |a|^2 + |b|^2 - 2 a.b made H 31 % and phi 210 % wrong, where
    the mean shift gives what torch's fp32 gives. The pass reads x once more: 15 us of a 672 us Triton step
    at 16 x 409,600 fp32 in the H200 profile of 2026-12-04; the step without the fused shift is not timed on
    a GPU yet.)"""
    centred = centring(x)
    return centred, gram_sq_dists(x, centred[SHIFT], mode, splits=splits, tile=tile)


def gram_sq_dists(
    x: torch.Tensor,
    shift: torch.Tensor,
    mode: int,
    *,
    splits: int | None = None,
    tile: TileConfig | None = None,
) -> torch.Tensor:
    """All n x n squared distances (float64, exact zero diagonal) of contiguous rows x (n, d) centred by
    shift (d values)."""
    n = x.shape[0]
    gram = _gram_sums(x, None, shift, mode, splits=splits, tile=tile)
    dist = torch.empty((n, n), dtype=torch.float64, device=x.device)
    _dists(gram, dist, dist, n, n, 0, kernel=False, acc=torch.float64)
    return dist


def gram_rbf_kernel(
    x: torch.Tensor, y: torch.Tensor | None, shift: torch.Tensor, h: torch.Tensor, mode: int, *, tile: TileConfig | None = None
) -> torch.Tensor:
    """rbf_kernel's K (n, m) in x's dtype from the Gram pass over the rows of x and (unless None: the self
    kernel) y, contiguous; h a (1,) tensor as utils.check_bandwidth gives it."""
    n = x.shape[0]
    m = n if y is None else y.shape[0]
    gram = _gram_sums(x, y, shift, mode, tile=tile)
    out = torch.empty((n, m), dtype=x.dtype, device=x.device)
    _dists(gram, out, h, n + (0 if y is None else m), n, 0 if y is None else n, kernel=True,
           acc=accumulation_dtype(x.dtype))  # fmt: skip
    return out


def _dists(gram, out, h, n, n_rows, col0, *, kernel, acc):
    """One launch of _gram_dists_kernel over out (n_rows x its columns)."""
    n_cols = out.shape[1]
    grid = (cdiv(n_rows, DISTS_BLOCK), cdiv(n_cols, DISTS_BLOCK))
    _gram_dists_kernel[grid](gram, out, h, n, n_rows, n_cols, col0, KERNEL=kernel, ACC=tl_dtype(acc), BLOCK=DISTS_BLOCK)


def _gram_sums(x, y, shift, mode, *, splits=None, tile=None) -> torch.Tensor:
    """The upper triangle (i <= j) of the (n, n) float64 Gram matrix of the rows of x (n_x) and y (None, or
    the rows n_x .. n - 1), centred by shift: the split-K partial sums of _gram_kernel, summed."""
    n_x, d = x.shape
    n = n_x + (0 if y is None else y.shape[0])
    acc = accumulation_dtype(x.dtype)
    nominal = tile or _GRAM.fixed
    if nominal.block_m != nominal.block_n:
        raise ValueError(f"the Gram kernel takes square tiles, got {nominal.block_m} x {nominal.block_n}")
    if splits is None:
        splits = gram_splits(n, d, x.device, nominal)
    cols_per_split = cdiv(cdiv(d, splits), BLOCK_D) * BLOCK_D
    splits = cdiv(d, cols_per_split)
    partial = torch.empty((splits, n, n), dtype=torch.float64, device=x.device)  # only i <= j is read
    _GRAM.launch(
        lambda meta: (cdiv(n, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]), splits),
        tile=tile,
        x_ptr=x,
        y_ptr=x if y is None else y,
        shift_ptr=shift,
        out_ptr=partial,
        n=n,
        n_x=n_x,
        d=d,
        stride_x=x.stride(0),
        stride_y=x.stride(0) if y is None else y.stride(0),
        cols_per_split=cols_per_split,
        BLOCK_D=BLOCK_D,
        ACC=tl_dtype(acc),
        MODE=mode,
        TWO_SETS=y is not None,
    )
    # The splits are summed by torch (one parallel reduction; summed in one program they were a serial loop
    # of hundreds of iterations on a GPU: 4 per SM), then one launch makes the distances (what were a dozen
    # small torch ops: triu, transpose, norms, clamp, diagonal; with rbf_kernel, its exp too).
    return partial[0] if splits == 1 else partial.sum(0)

