"""The fused SVGD step on the GPU in Triton: phi (n, d) from particles x and scores, never n x n.

    phi_i = (1/n) [ (K @ W)_i + (2/H) rowsum(K)_i xc_i ],   W = score - (2/H) xc,  K_ij = exp(-|x_i - x_j|^2 / H)

(folding the repulsion into W halves the work of K @ [score | x]). One kernel serves both regimes:

  tiled (many particles): FlashAttention-style. A program holds a block of rows and one chunk of output
      columns (BLOCK_V) on chip and streams blocks of columns j: distances by tl.dot on centred rows (d
      looped in BLOCK_D chunks), exp, then acc += K_tile @ W_j and rowsum += K_tile.sum(1) in fp32. For
      d > BLOCK_V, each output chunk recomputes the distances (d / BLOCK_V times the 2 n^2 d distance
      FLOPs): the many-particle regime has moderate d. With few row blocks, the columns are split among
      programs (as flash-decoding does) and a second kernel sums the partial accumulators.
  gram (few particles, huge d): split-K Gram matrix over d (kernels/gram.py), the tiny n x n distances,
      then the same kernel reads the distance tile instead of recomputing it: one memory-bound pass over
      score and x.
"""

import torch
import triton
import triton.language as tl

from bmt_fast import reference

from .centring import centring_shift
from .gram import gram_sq_dists
from .median import median_sq_dist, use_gram
from .tiles import dot_acc, dot_operand, load_centred, sq_dist_tile
from .utils import (
    MIN_BLOCK,
    TileConfig,
    accumulation_dtype,
    check_bandwidth,
    check_device,
    check_like,
    check_rows,
    dot_mode,
    ensure_contiguous,
    next_power_of_2,
    num_programs_target,
    tl_dtype,
    tunable,
)

# Widest chunk of output columns a program holds: a (128 x 128) fp32 accumulator fills 8 warps' registers.
MAX_BLOCK_V = 128


def max_block_v(acc: torch.dtype) -> int:
    """Output columns per program: 128, or 64 in fp64, where the (BLOCK_N x BLOCK_V) and K tiles staged for
    tl.dot would need 256 KiB of shared memory at 64 x 64 rows and 2 stages (sm_90 allows 227 KiB; found
    on an H200, checked on CPU by tests/test_triton_sm90_compile.py)."""
    return MAX_BLOCK_V // 2 if acc == torch.float64 else MAX_BLOCK_V


@triton.jit
def _svgd_step_kernel(
    x_ptr,
    score_ptr,
    shift_ptr,
    h_ptr,
    dist_ptr,
    out_ptr,
    rowsum_ptr,
    n,
    d,
    stride_x,
    stride_score,
    stride_dist,
    stride_out,
    DIST_GIVEN: tl.constexpr,
    FINALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
    MODE: tl.constexpr,
):
    """Rows of block program_id(0), output columns of chunk program_id(1), columns j of split program_id(2).

    DIST_GIVEN: read squared distances from dist (n, n) (Gram path) instead of recomputing them.
    FINALIZE: write phi; otherwise write this split's K @ W to out[split] and its row sums to rowsum[split].
    """
    split = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    vcols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    h = tl.load(h_ptr)
    neg_inv_h = -1.0 / h
    repulsion = 2.0 / h
    col_blocks = tl.cdiv(tl.cdiv(n, BLOCK_N), tl.num_programs(2))
    j_start = split * col_blocks * BLOCK_N
    j_end = tl.minimum(n, j_start + col_blocks * BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=ACC)
    rowsum = tl.zeros((BLOCK_M,), dtype=ACC)
    for j0 in range(j_start, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        if DIST_GIVEN:
            mask = (rows < n)[:, None] & (cols < n)[None, :]
            d2 = tl.load(dist_ptr + rows[:, None] * stride_dist + cols[None, :], mask=mask, other=0.0)
        else:
            d2 = sq_dist_tile(
                x_ptr, x_ptr, shift_ptr, rows, cols, n, n, d, stride_x, stride_x, True, BLOCK_M, BLOCK_N, BLOCK_D, ACC, MODE
            )
        k = tl.where((cols < j_end)[None, :], tl.exp(d2 * neg_inv_h), 0.0)
        k = dot_operand(k, MODE)  # the row sums use the K the dot sees: the two terms stay consistent
        rowsum += tl.sum(k, axis=1)
        xc_j = load_centred(x_ptr, shift_ptr, cols, vcols, j_end, d, stride_x, ACC)
        score_mask = (cols < j_end)[:, None] & (vcols < d)[None, :]
        score_j = tl.load(score_ptr + cols[:, None] * stride_score + vcols[None, :], mask=score_mask, other=0.0)
        w = dot_operand(score_j.to(ACC) - repulsion * xc_j, MODE)
        acc = dot_acc(k, w, acc, MODE)

    out_mask = (rows < n)[:, None] & (vcols < d)[None, :]
    if FINALIZE:
        xc_i = load_centred(x_ptr, shift_ptr, rows, vcols, n, d, stride_x, ACC)
        phi = (acc + repulsion * rowsum[:, None] * xc_i) / n
        tl.store(out_ptr + rows[:, None] * stride_out + vcols[None, :], phi.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + split * n * d + rows[:, None] * d + vcols[None, :], acc, mask=out_mask)
        if tl.program_id(1) == 0:
            tl.store(rowsum_ptr + split * n + rows, rowsum, mask=rows < n)


@triton.jit
def _svgd_combine_kernel(
    partial_ptr,
    rowsum_ptr,
    x_ptr,
    shift_ptr,
    h_ptr,
    out_ptr,
    n,
    d,
    splits,
    stride_x,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    """phi from the column splits' partial K @ W (splits, n, d) and row sums (splits, n)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    vcols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = (rows < n)[:, None] & (vcols < d)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=ACC)
    rowsum = tl.zeros((BLOCK_M,), dtype=ACC)
    for split in range(0, splits):
        acc += tl.load(partial_ptr + split * n * d + rows[:, None] * d + vcols[None, :], mask=mask, other=0.0)
        rowsum += tl.load(rowsum_ptr + split * n + rows, mask=rows < n, other=0.0)
    h = tl.load(h_ptr)
    xc_i = load_centred(x_ptr, shift_ptr, rows, vcols, n, d, stride_x, ACC)
    phi = (acc + (2.0 / h) * rowsum[:, None] * xc_i) / n
    tl.store(out_ptr + rows[:, None] * d + vcols[None, :], phi.to(out_ptr.dtype.element_ty), mask=mask)


_SVGD = tunable(_svgd_step_kernel, key=["n", "d"])


def _column_splits(n: int, d: int, block_v: int, device: torch.device, tile: TileConfig) -> int:
    """Split the columns j when row blocks x output chunks leave the device idle; >= 4 blocks per split."""
    programs = triton.cdiv(n, tile.block_m) * triton.cdiv(d, block_v)
    return max(1, min(num_programs_target(device) // programs, triton.cdiv(n, 4 * tile.block_n)))


def _apply(x, score, shift, h, dist, *, mode, splits, tile):
    """Launch the SVGD kernel (tiled when dist is None, else over the given distances)."""
    n, d = x.shape
    acc = accumulation_dtype(x.dtype)
    block_v = next_power_of_2(d, low=MIN_BLOCK, high=max_block_v(acc))
    nominal = tile or _SVGD.fixed
    if splits is None:
        splits = 1 if dist is not None else _column_splits(n, d, block_v, x.device, nominal)
    splits = min(splits, triton.cdiv(n, nominal.block_n))
    out = torch.empty_like(x)
    finalize = splits == 1
    partial = out if finalize else torch.empty((splits, n, d), dtype=acc, device=x.device)
    rowsums = partial if finalize else torch.empty((splits, n), dtype=acc, device=x.device)
    _SVGD.launch(
        lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, block_v), splits),
        tile=tile,
        x_ptr=x,
        score_ptr=score,
        shift_ptr=shift,
        h_ptr=h,
        dist_ptr=dist if dist is not None else x,
        out_ptr=partial,
        rowsum_ptr=rowsums,
        n=n,
        d=d,
        stride_x=x.stride(0),
        stride_score=score.stride(0),
        stride_dist=n,
        stride_out=out.stride(0),
        DIST_GIVEN=dist is not None,
        FINALIZE=finalize,
        BLOCK_D=next_power_of_2(d, low=MIN_BLOCK, high=64),
        BLOCK_V=block_v,
        ACC=tl_dtype(acc),
        MODE=mode,
    )
    if not finalize:
        grid = (triton.cdiv(n, 64), triton.cdiv(d, block_v))
        _svgd_combine_kernel[grid](
            partial, rowsums, x, shift, h, out, n, d, splits, x.stride(0), BLOCK_M=64, BLOCK_V=block_v, ACC=tl_dtype(acc)
        )
    return out


@ensure_contiguous
def svgd_step_forward(
    x: torch.Tensor,
    score: torch.Tensor,
    bandwidth: torch.Tensor | None = None,
    *,
    algorithm: str = "auto",
    allow_tf32: bool | None = None,
    splits: int | None = None,
    tile: TileConfig | None = None,
) -> torch.Tensor:
    """phi for rows x, score (n, d); bandwidth None = the exact median rule.

    algorithm: "auto" (gram for n <= median.GRAM_MAX_PARTICLES), "tiled" or "gram".
    allow_tf32: the dot precision (utils.dot_mode). splits / tile: force the column (tiled) or d (Gram)
    splits and the tile, for tests; None = chosen for the device (autotuned on a GPU).
    """
    check_rows("x", x)
    check_rows("score", score)
    check_like("x", x, "score", score)
    if score.shape != x.shape:
        raise ValueError(f"score must have the shape of x {tuple(x.shape)}, got {tuple(score.shape)}")
    check_device(x)
    n = x.shape[0]
    mode = dot_mode(x.dtype, allow_tf32)
    shift = centring_shift(x)
    gram = use_gram(n, algorithm)
    dist = None
    if bandwidth is None:
        median, dist = median_sq_dist(x, shift, mode, algorithm, splits=splits, tile=tile)
        bandwidth = reference.bandwidth_from_median(median, n)
    elif gram:
        dist = gram_sq_dists(x, shift, mode, splits=splits, tile=tile)
    h = check_bandwidth(bandwidth, x)
    if dist is not None:
        dist = dist.to(h.dtype)
    return _apply(x, score, shift, h, dist, mode=mode, splits=None if gram else splits, tile=tile)


@torch.library.custom_op("bmt_fast_triton::svgd_step", mutates_args=())
def svgd_step(
    x: torch.Tensor,
    score: torch.Tensor,
    bandwidth: torch.Tensor | None = None,
    algorithm: str = "auto",
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    """SVGD direction phi (n, d) for rows x and score; bandwidth None = exact median rule."""
    return svgd_step_forward(x, score, bandwidth, algorithm=algorithm, allow_tf32=allow_tf32)


@svgd_step.register_fake
def _(x, score, bandwidth=None, algorithm="auto", allow_tf32=None):
    check_rows("x", x)
    check_rows("score", score)
    check_like("x", x, "score", score)
    torch._check(score.shape == x.shape, lambda: f"score must have the shape of x {tuple(x.shape)}")
    use_gram(1, algorithm)
    return torch.empty_like(x, memory_format=torch.contiguous_format)
