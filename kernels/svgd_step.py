"""The fused SVGD step on the GPU in Triton: phi (n, d) from particles x and scores, never n x n.

    phi_i = (1/n) [ (K' @ W)_i + (2/H) rowsum(K')_i xc_i + score_i ],   W = score - (2/H) xc,
    K_ij = exp(-|x_i - x_j|^2 / H),   K' = K without its diagonal (K_ii = 1: its term is score_i)

(folding the repulsion into W halves the work of K @ [score | x]; a particle's own term is kept out of the
fold, where its two large terms would cancel for H far below the squared distances). In bf16's one-product
mode, particles far apart next to the kernel's width (splits_w) take acc = K score + K' xs instead, K' =
-(2/H) K rounded as the dot takes it and xs the exactly shifted bf16 particles (kernels/centring.py):
W's rounding of (2/H) xc is large next to the repulsion there. One kernel serves both regimes:

  tiled (many particles): FlashAttention-style. A program holds a block of rows and one chunk of output
      columns (BLOCK_V) on chip and streams blocks of columns j: distances by tl.dot on centred rows (d
      looped in BLOCK_D chunks), exp, then acc += K_tile @ W_j and rowsum += K_tile.sum(1) in fp32. For
      d > BLOCK_V, each output chunk recomputes the distances (d / BLOCK_V times the 2 n^2 d distance
      FLOPs): the many-particle regime has moderate d. With few row blocks, the columns are split among
      programs (as flash-decoding does) and a second kernel sums the partial accumulators.
  gram (few particles, huge d): split-K Gram matrix over d (kernels/gram.py), the tiny n x n distances,
      then the same kernel reads the distance tile instead of recomputing it: one memory-bound pass over
      score and x.
  flash (many particles, d <= FLASH_MAX_D, tensor-core modes: TF32, bf16, split bf16): the tiled path
      with the per-particle work taken out of the loop. A first kernel writes the dot operands once (the
      centred rows and W, rounded or split as the mode multiplies them, zero-padded to D_PAD columns and
      to whole tiles of rows) and the norms pre-scaled by log2(e)/H (+inf for padding rows, so padded
      columns give K = 0 without masks). The main kernel then holds its rows' operands on chip and only
      streams: S = A_I A_J^T, K = exp2(min(2 c S - c|a_i|^2 - c|a_j|^2, 0)), acc += K W_J. The tiled
      kernel instead re-centred, re-rounded (or re-split) and re-derived W and the norms of every column
      block for every row block (and its own rows' once per column block).
"""

import torch
import triton
import triton.language as tl

from bmt_fast import reference
from bmt_fast._validation import check_out, overlaps

from .centring import CENTRE_ROW, SHIFT, SHIFT_ROW, centring, largest_spread
from .gram import gram_centring_and_sq_dists, gram_median
from .median import median_sq_dist, use_gram
from .tiles import (
    MODE_HALF,
    MODE_HALF_SPLIT,
    dot_acc,
    dot_operand,
    half_dot,
    half_operand,
    load_bandwidth,
    load_centred,
    operand_sq_norms,
    sq_dist_tile,
    to_half,
    to_output,
)
from .utils import (
    DOT_HALF,
    DOT_HALF_SPLIT,
    DOT_IEEE,
    GPU_TILES,
    MIN_BLOCK,
    SMALL_TILES,
    TileConfig,
    accumulation_dtype,
    cdiv,
    check_bandwidth,
    check_device,
    check_grid_axis,
    check_like,
    check_rows,
    dot_mode,
    ensure_contiguous,
    next_power_of_2,
    num_programs_target,
    tl_dtype,
    tunable,
)

# The step splits W (splits_w) where some |x - centre| exceeds this many sqrt(H), as the CPU's AMX path.
SPLIT_SPREAD: tl.constexpr = tl.constexpr(8.0)

# Widest chunk of output columns a program holds: a (128 x 128) fp32 accumulator fills 8 warps' registers.
MAX_BLOCK_V = 128


def max_block_v(acc: torch.dtype) -> int:
    """Output columns per program: 128, or 64 in fp64, where the (BLOCK_N x BLOCK_V) and K tiles staged for
    tl.dot would need 256 KiB of shared memory at 64 x 64 rows and 2 stages (sm_90 allows 227 KiB; found
    on an H200, checked on CPU by tests/test_triton_sm90_compile.py)."""
    return MAX_BLOCK_V // 2 if acc == torch.float64 else MAX_BLOCK_V


LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _split_columns(n, BLOCK_N: tl.constexpr):
    """[j_start, j_end): the columns j of split program_id(2), whole blocks of BLOCK_N (the last may pass n)."""
    col_blocks = tl.cdiv(tl.cdiv(n, BLOCK_N), tl.num_programs(2))
    j_start = tl.program_id(2) * col_blocks * BLOCK_N
    return j_start, tl.minimum(n, j_start + col_blocks * BLOCK_N)


@triton.jit
def splits_w(spread_ptr, h):
    """Whether the step multiplies K by score and by the shifted particles apart (acc = K S + K' Xs, with
    K' = -(2/H) K rounded as the dot takes it and the row sums of K') instead of by the folded W = score -
    (2/H) Xc: where the largest |x - centre| (centring.largest_spread: one value, reduced once per call)
    exceeds SPLIT_SPREAD sqrt(H); a NaN spread: folded. Asked for bf16 particles in the one-product mode only, whose
    shifted values are bf16 values: exact operands (fp16's, rounded to bf16, would not cancel the row sums'
    term)."""
    largest = tl.load(spread_ptr).to(h.dtype)
    return largest * largest > h * (SPLIT_SPREAD * SPLIT_SPREAD)


@triton.jit
def _write_result(acc, rowsum, rows, vcols, x_ptr, centring_ptr, score_ptr, h, split, out_ptr, rowsum_ptr, finite_ptr,
                  n, d, stride_x, stride_score, stride_out, FINALIZE: tl.constexpr, WRITE_ROWSUM: tl.constexpr,
                  TRACK_FINITE: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """FINALIZE: phi = (acc + (2/H) rowsum xc_i + score_i) / n into out, xc_i = x_i - centre (split: phi =
    (acc - rowsum' xs_i + score_i) / n, xs_i = x_i - shift, rowsum' those of K'; splits_w) (acc and rowsum leave
    out the own term k_ii = 1, added here as score_i: folded into W it is (score_i - (2/H) xc_i) + (2/H) xc_i,
    whose two large terms cancel when H lies far below the squared distances), and (TRACK_FINITE) finite[0] = 0 where a
    stored value is NaN/Inf (a value past the range of a narrower output is Inf once stored); otherwise
    this split's acc to out[split] and (WRITE_ROWSUM) its row sums to rowsum[split], for
    _svgd_combine_kernel."""
    out_mask = (rows < n)[:, None] & (vcols < d)[None, :]
    if FINALIZE:
        if split:
            coef = -rowsum
            xc_i = load_centred(x_ptr, centring_ptr + SHIFT_ROW * d, rows, vcols, n, d, stride_x, ACC)
        else:
            coef = (2.0 / h) * rowsum
            xc_i = load_centred(x_ptr, centring_ptr + CENTRE_ROW * d, rows, vcols, n, d, stride_x, ACC)
        score_i = tl.load(score_ptr + rows[:, None] * stride_score + vcols[None, :], mask=out_mask, other=0.0)
        phi = (acc + coef[:, None] * xc_i + score_i.to(ACC)) / n
        stored = to_output(phi, out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * stride_out + vcols[None, :], stored, mask=out_mask)
        if TRACK_FINITE:
            v = stored.to(ACC)
            bad = tl.sum((out_mask & ((v != v) | (tl.abs(v) == float("inf")))).to(tl.int32))
            tl.store(finite_ptr, 0, mask=bad > 0)
    else:
        split = tl.program_id(2)
        tl.store(out_ptr + split * n * d + rows[:, None] * d + vcols[None, :], acc, mask=out_mask)
        if WRITE_ROWSUM:
            tl.store(rowsum_ptr + split * n + rows, rowsum, mask=rows < n)


@triton.jit
def _svgd_step_kernel(
    x_ptr,
    score_ptr,
    centring_ptr,
    spread_ptr,
    h_ptr,
    dist_ptr,
    out_ptr,
    rowsum_ptr,
    finite_ptr,
    n,
    d,
    stride_x,
    stride_score,
    stride_dist,
    stride_out,
    DIST_GIVEN: tl.constexpr,
    FINALIZE: tl.constexpr,
    TRACK_FINITE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
    MODE: tl.constexpr,
):
    """Rows of block program_id(0), output columns of chunk program_id(1), columns j of split program_id(2).

    DIST_GIVEN: read squared distances from dist (n, n, float64; Gram path) instead of recomputing them.
    FINALIZE: write phi; otherwise write this split's K @ W to out[split] and its row sums to rowsum[split].
    TRACK_FINITE (with FINALIZE): clear finite[0] on a NaN/Inf phi value.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    vcols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    h = load_bandwidth(h_ptr, ACC)
    neg_inv_h = -1.0 / h
    repulsion = 2.0 / h
    split = False
    if MODE == MODE_HALF and x_ptr.dtype.element_ty == tl.bfloat16:
        split = splits_w(spread_ptr, h)
    j_start, j_end = _split_columns(n, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=ACC)
    rowsum = tl.zeros((BLOCK_M,), dtype=ACC)
    for j0 in range(j_start, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        if DIST_GIVEN:
            mask = (rows < n)[:, None] & (cols < n)[None, :]
            d2 = tl.load(dist_ptr + rows[:, None] * stride_dist + cols[None, :], mask=mask, other=0.0).to(ACC)
        else:
            d2 = sq_dist_tile(
                x_ptr, x_ptr, centring_ptr + SHIFT_ROW * d, rows, cols, n, n, d, stride_x, stride_x, True, BLOCK_M, BLOCK_N,
                BLOCK_D, ACC, MODE,
            )  # fmt: skip
        k = tl.where((cols < j_end)[None, :] & (rows[:, None] != cols[None, :]), tl.exp(d2 * neg_inv_h), 0.0)
        score_mask = (cols < j_end)[:, None] & (vcols < d)[None, :]
        score_j = tl.load(score_ptr + cols[:, None] * stride_score + vcols[None, :], mask=score_mask, other=0.0)
        score_j = score_j.to(ACC)
        # the row sums are those of the K the dot sees: the two terms stay consistent
        if split:
            k_x = dot_operand(-repulsion * k, MODE)
            rowsum += tl.sum(k_x, axis=1)
            acc = dot_acc(dot_operand(k, MODE), dot_operand(score_j, MODE), acc, MODE)
            xs_j = load_centred(x_ptr, centring_ptr + SHIFT_ROW * d, cols, vcols, j_end, d, stride_x, ACC)
            acc = dot_acc(k_x, xs_j, acc, MODE)  # (xs_j: bf16 values)
        else:
            k = dot_operand(k, MODE)
            rowsum += tl.sum(k, axis=1)
            xc_j = load_centred(x_ptr, centring_ptr + CENTRE_ROW * d, cols, vcols, j_end, d, stride_x, ACC)
            w = dot_operand(score_j - repulsion * xc_j, MODE)
            acc = dot_acc(k, w, acc, MODE)

    _write_result(acc, rowsum, rows, vcols, x_ptr, centring_ptr, score_ptr, h, split, out_ptr, rowsum_ptr, finite_ptr,
                  n, d, stride_x, stride_score, stride_out, FINALIZE, tl.program_id(1) == 0, TRACK_FINITE, ACC)  # fmt: skip


@triton.jit
def _svgd_combine_kernel(
    partial_ptr,
    rowsum_ptr,
    x_ptr,
    centring_ptr,
    spread_ptr,
    score_ptr,
    h_ptr,
    out_ptr,
    n,
    d,
    splits,
    stride_x,
    stride_score,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
    MODE: tl.constexpr,
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
    h = load_bandwidth(h_ptr, ACC)
    split = False
    if MODE == MODE_HALF and x_ptr.dtype.element_ty == tl.bfloat16:
        split = splits_w(spread_ptr, h)
    _write_result(acc, rowsum, rows, vcols, x_ptr, centring_ptr, score_ptr, h, split, out_ptr, rowsum_ptr, rowsum_ptr,
                  n, d, stride_x, stride_score, d, True, False, False, ACC)  # fmt: skip


# Largest d of the flash path: one (BLOCK_M x D_PAD) accumulator and the rows' operands stay on chip.
FLASH_MAX_D = 128
# Rows of the operand arrays are padded to whole tiles of this many rows (every BLOCK_M / BLOCK_N divides it).
FLASH_ROW_PAD = 128


@triton.jit
def _flash_operands_kernel(
    x_ptr,
    score_ptr,
    centring_ptr,
    spread_ptr,
    h_ptr,
    a_hi_ptr,
    a_lo_ptr,
    w_hi_ptr,
    w_lo_ptr,
    norm_ptr,
    n,
    d,
    stride_x,
    stride_score,
    D_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACC: tl.constexpr,
    MODE: tl.constexpr,
):
    """Rows of block program_id(0): a = x - shift (rounded as the dot multiplies it), W = score - (2/H) xc, xc =
    x - centre (the same; where splits_w, score itself: the main kernel multiplies a for the particles), in
    the operand arrays (n_pad, D_PAD): bf16 hi (and lo, split mode) parts in the half modes, ACC otherwise;
    zero outside (n, d). norm = |a|^2 log2(e)/H, +inf for rows >= n."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D_PAD)
    h = load_bandwidth(h_ptr, ACC)
    a = dot_operand(load_centred(x_ptr, centring_ptr + SHIFT_ROW * d, rows, cols, n, d, stride_x, ACC), MODE)
    mask = (rows < n)[:, None] & (cols < d)[None, :]
    score = tl.load(score_ptr + rows[:, None] * stride_score + cols[None, :], mask=mask, other=0.0).to(ACC)
    split = False
    if MODE == MODE_HALF and x_ptr.dtype.element_ty == tl.bfloat16:
        split = splits_w(spread_ptr, h)
    if split:
        w = dot_operand(score, MODE)
    else:
        xc = load_centred(x_ptr, centring_ptr + CENTRE_ROW * d, rows, cols, n, d, stride_x, ACC)
        w = dot_operand(score - (2.0 / h) * xc, MODE)
    norm = operand_sq_norms(a, MODE, 0.0) * (LOG2E / h)
    tl.store(norm_ptr + rows, tl.where(rows < n, norm, float("inf")))
    offsets = rows[:, None] * D_PAD + cols[None, :]
    if MODE == MODE_HALF or MODE == MODE_HALF_SPLIT:
        a_hi = to_half(a)
        w_hi = to_half(w)
        tl.store(a_hi_ptr + offsets, a_hi)
        tl.store(w_hi_ptr + offsets, w_hi)
        if MODE == MODE_HALF_SPLIT:
            tl.store(a_lo_ptr + offsets, to_half(a - a_hi.to(ACC)))
            tl.store(w_lo_ptr + offsets, to_half(w - w_hi.to(ACC)))
    else:
        tl.store(a_hi_ptr + offsets, a)
        tl.store(w_hi_ptr + offsets, w)


@triton.jit
def _flash_dot(a_hi, a_lo, b_hi, b_lo, acc, MODE: tl.constexpr):
    """acc + a @ b for operands as _flash_operands_kernel stores them (lo parts used in split mode only)."""
    if MODE == MODE_HALF_SPLIT:  # (four products, as tiles.dot_acc)
        acc = half_dot(half_operand(a_lo), half_operand(b_lo), acc)  # small terms first
        acc = half_dot(half_operand(a_hi), half_operand(b_lo), acc)
        acc = half_dot(half_operand(a_lo), half_operand(b_hi), acc)
        return half_dot(half_operand(a_hi), half_operand(b_hi), acc)
    elif MODE == MODE_HALF:
        return half_dot(half_operand(a_hi), half_operand(b_hi), acc)
    else:
        return dot_acc(a_hi, b_hi, acc, MODE)


@triton.jit
def _svgd_flash_kernel(
    a_hi_ptr,
    a_lo_ptr,
    w_hi_ptr,
    w_lo_ptr,
    norm_ptr,
    x_ptr,
    centring_ptr,
    spread_ptr,
    score_ptr,
    h_ptr,
    out_ptr,
    rowsum_ptr,
    n,
    d,
    stride_x,
    stride_score,
    stride_out,
    FINALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    ACC: tl.constexpr,
    MODE: tl.constexpr,
):
    """Rows of block program_id(0) against the columns j of split program_id(2), from the operand arrays
    of _flash_operands_kernel (no masks in the loop: padding rows have zero operands and +inf norms).
    K_ii is set to 0 and its term (k_ii = 1: score_i) added exactly at the end (_write_result): its exponent
    c (2 a_i.a_i - 2 |a_i|^2) is a difference of large terms when H << |a_i|^2 (the split products keep
    16 bits of each operand), and its term folded into W would cancel against the row sum's. Compiled for sm_90, this select
    on every tile kept the loop free of register spills; peeling the diagonal blocks into a loop of their
    own (as FlashAttention's causal stages) made it spill.

    FINALIZE: write phi; otherwise this split's K @ W to out[split] and its row sums to rowsum[split] (for
    _svgd_combine_kernel).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, D_PAD)
    h = load_bandwidth(h_ptr, ACC)
    two_c = 2.0 * LOG2E / h
    neg_repulsion = -2.0 / h
    split = False
    if MODE == MODE_HALF and x_ptr.dtype.element_ty == tl.bfloat16:
        split = splits_w(spread_ptr, h)
    row_offsets = rows[:, None] * D_PAD + dcols[None, :]
    q_hi = tl.load(a_hi_ptr + row_offsets)
    q_lo = q_hi
    if MODE == MODE_HALF_SPLIT:
        q_lo = tl.load(a_lo_ptr + row_offsets)
    norm_i = tl.load(norm_ptr + rows)
    j_start, j_end = _split_columns(n, BLOCK_N)

    acc = tl.zeros((BLOCK_M, D_PAD), dtype=ACC)
    rowsum = tl.zeros((BLOCK_M,), dtype=ACC)
    for j0 in range(j_start, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_offsets = cols[:, None] * D_PAD + dcols[None, :]
        k_hi = tl.load(a_hi_ptr + col_offsets)
        k_lo = k_hi
        if MODE == MODE_HALF_SPLIT:
            k_lo = tl.load(a_lo_ptr + col_offsets)
        s = _flash_dot(q_hi, q_lo, tl.trans(k_hi), tl.trans(k_lo), tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), MODE)
        norm_j = tl.load(norm_ptr + cols)
        # (NaN kept: a NaN particle's K is NaN, not the 1 of a GPU's plain min)
        k = tl.math.exp2(tl.minimum(s * two_c - norm_i[:, None] - norm_j[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL))
        k = tl.where(rows[:, None] == cols[None, :], 0.0, k)
        w_hi = tl.load(w_hi_ptr + col_offsets)
        if MODE == MODE_HALF_SPLIT:
            w_lo = tl.load(w_lo_ptr + col_offsets)
            k_hi16 = to_half(k)
            k_lo16 = to_half(k - k_hi16.to(ACC))
            rowsum += tl.sum(k, axis=1)
            acc = _flash_dot(k_hi16, k_lo16, w_hi, w_lo, acc, MODE)
        elif MODE == MODE_HALF:
            k16 = to_half(k)
            if split:  # K S + K' Xs, Xs the distances' operand (k_hi; splits_w)
                kx16 = to_half(neg_repulsion * k)
                rowsum += tl.sum(kx16.to(ACC), axis=1)  # the K' the dot multiplies
                acc = _flash_dot(k16, k16, w_hi, w_hi, acc, MODE)
                acc = _flash_dot(kx16, kx16, k_hi, k_hi, acc, MODE)
            else:
                rowsum += tl.sum(k16.to(ACC), axis=1)  # the K the dot multiplies
                acc = _flash_dot(k16, k16, w_hi, w_hi, acc, MODE)
        else:
            k = dot_operand(k, MODE)
            rowsum += tl.sum(k, axis=1)
            acc = dot_acc(k, w_hi, acc, MODE)

    _write_result(acc, rowsum, rows, dcols, x_ptr, centring_ptr, score_ptr, h, split, out_ptr, rowsum_ptr, rowsum_ptr,
                  n, d, stride_x, stride_score, stride_out, FINALIZE, True, False, ACC)  # fmt: skip


_SVGD = tunable(_svgd_step_kernel, key=["n", "d"])
# The Gram path's apply pass (distances given, n <= GRAM_MAX_PARTICLES) has its own candidates: a prompt's
# 16 particles in a 64-row tile, against 64 columns j, spent 15 of every 16 products on padding (on an H200
# this pass took 444 us at n = 16, d = 409,600, where reading x and score and writing phi at the copy's
# bandwidth takes ~21 us; benchmarks/results/nvidia-h200_profile_2026-12-04.txt). Tiles of 16 and 32 rows
# first, the tiled kernel's after them: the autotuner keeps whichever runs fastest for each n and d.
GRAM_APPLY_TILES = [*SMALL_TILES, *GPU_TILES]
_SVGD_GRAM = tunable(_svgd_step_kernel, key=["n", "d"], tiles=GRAM_APPLY_TILES)
# FlashAttention-style candidates (the fixed tile first, as in GPU_TILES). Compiled for sm_90 here with
# aligned operands, all but the 128 x 128 tile keep the loop free of register spills in every mode (the
# tiled kernel at d = 128 spills 24-468 bytes in 7 of its 10 half-mode candidates).
FLASH_TILES = [
    TileConfig(64, 64, 4, 2),
    TileConfig(64, 64, 4, 3),
    TileConfig(128, 64, 8, 2),
    TileConfig(128, 64, 8, 3),
    TileConfig(128, 128, 8, 2),
]
_FLASH = tunable(_svgd_flash_kernel, key=["n", "d"], tiles=FLASH_TILES)


def _column_splits(n: int, d: int, block_v: int, device: torch.device, tile: TileConfig) -> int:
    """Split the columns j when row blocks x output chunks leave the device idle; >= 4 blocks per split."""
    programs = cdiv(n, tile.block_m) * cdiv(d, block_v)
    return max(1, min(num_programs_target(device) // programs, cdiv(n, 4 * tile.block_n)))


# False sends every many-particle step to the tiled kernel: the benchmarks' side-by-side provider
# bmt_fast-triton-tiled (benchmarks/providers.py) sets it around its calls.
FLASH_ENABLED = True


def use_flash(d: int, mode: int) -> bool:
    """The flash path: many particles, d <= FLASH_MAX_D, a tensor-core mode (TF32, bf16, split bf16). The
    IEEE fp32 / fp64 products keep the tiled kernel, whose H200 timings the auto rule rests on."""
    return FLASH_ENABLED and mode != DOT_IEEE and d <= FLASH_MAX_D


def _split_outputs(x, splits, out=None):
    """(out, partial, rowsums): one split writes phi into out (given, or new); several write partial sums
    (splits, n, d) and row sums (splits, n) that _combine turns into out."""
    n, d = x.shape
    acc = accumulation_dtype(x.dtype)
    if out is None:
        out = torch.empty_like(x)
    if splits == 1:
        return out, out, out
    return out, torch.empty((splits, n, d), dtype=acc, device=x.device), torch.empty((splits, n), dtype=acc, device=x.device)


def _apply_flash(x, score, centred, spread, h, *, mode, splits, tile, out=None):
    """The flash path: operands once (_flash_operands_kernel), then _svgd_flash_kernel (+ combine)."""
    n, d = x.shape
    acc = accumulation_dtype(x.dtype)
    d_pad = next_power_of_2(d, low=MIN_BLOCK, high=FLASH_MAX_D)
    n_pad = cdiv(n, FLASH_ROW_PAD) * FLASH_ROW_PAD
    half = mode in (DOT_HALF, DOT_HALF_SPLIT)
    store = torch.bfloat16 if half else acc
    a_hi, w_hi = (torch.empty((n_pad, d_pad), dtype=store, device=x.device) for _ in range(2))
    a_lo, w_lo = (
        (torch.empty((n_pad, d_pad), dtype=store, device=x.device) for _ in range(2))
        if mode == DOT_HALF_SPLIT
        else (a_hi, w_hi)
    )
    norms = torch.empty((n_pad,), dtype=acc, device=x.device)
    block_r = 32
    _flash_operands_kernel[(n_pad // block_r,)](
        x, score, centred, spread, h, a_hi, a_lo, w_hi, w_lo, norms, n, d, x.stride(0), score.stride(0),
        D_PAD=d_pad, BLOCK_R=block_r, ACC=tl_dtype(acc), MODE=mode,
    )  # fmt: skip
    nominal = tile or _FLASH.fixed
    if splits is None:
        splits = _column_splits(n, d, d_pad, x.device, nominal)
    splits = min(splits, cdiv(n, nominal.block_n))
    out, partial, rowsums = _split_outputs(x, splits, out)
    _FLASH.launch(
        lambda meta: (cdiv(n, meta["BLOCK_M"]), 1, splits),
        tile=tile,
        a_hi_ptr=a_hi,
        a_lo_ptr=a_lo,
        w_hi_ptr=w_hi,
        w_lo_ptr=w_lo,
        norm_ptr=norms,
        x_ptr=x,
        centring_ptr=centred,
        spread_ptr=spread,
        score_ptr=score,
        h_ptr=h,
        out_ptr=partial,
        rowsum_ptr=rowsums,
        n=n,
        d=d,
        stride_x=x.stride(0),
        stride_score=score.stride(0),
        stride_out=out.stride(0),
        FINALIZE=splits == 1,
        D_PAD=d_pad,
        ACC=tl_dtype(acc),
        MODE=mode,
    )
    if splits > 1:
        _combine(partial, rowsums, x, score, centred, spread, h, out, splits, d_pad, mode)
    return out


def _combine(partial, rowsums, x, score, centred, spread, h, out, splits, block_v, mode):
    """phi from the column splits' partial sums."""
    n, d = x.shape
    check_grid_axis("phi's column chunks", cdiv(d, block_v))
    grid = (cdiv(n, 64), cdiv(d, block_v))
    _svgd_combine_kernel[grid](
        partial, rowsums, x, centred, spread, score, h, out, n, d, splits, x.stride(0), score.stride(0), BLOCK_M=64,
        BLOCK_V=block_v,
        ACC=tl_dtype(accumulation_dtype(x.dtype)),
        MODE=mode,
    )  # fmt: skip


def _apply(x, score, centred, h, dist, *, mode, splits, tile, out=None, finite=None):
    """Launch the SVGD kernel (tiled when dist is None, else over the given distances) into out (or a new
    tensor). centred: centring(x); bf16 particles in the one-product mode also have the kernels read its
    largest spread (splits_w: one small reduction, there only). finite (a 0-dim uint8 holding 1, or None): where one
    pass writes phi (one column split: always on the Gram path), the kernel clears it as it stores a
    NaN/Inf; returns (phi, whether finite was tracked)."""
    # (read by bf16 particles in that mode only)
    spread = largest_spread(centred) if mode == DOT_HALF and x.dtype == torch.bfloat16 else centred
    n, d = x.shape
    if dist is None and use_flash(d, mode):
        return _apply_flash(x, score, centred, spread, h, mode=mode, splits=splits, tile=tile, out=out), False
    acc = accumulation_dtype(x.dtype)
    block_v = next_power_of_2(d, low=MIN_BLOCK, high=max_block_v(acc))
    nominal = tile or _SVGD.fixed
    if splits is None:
        splits = 1 if dist is not None else _column_splits(n, d, block_v, x.device, nominal)
    splits = min(splits, cdiv(n, nominal.block_n))
    check_grid_axis("phi's column chunks", cdiv(d, block_v))
    out, partial, rowsums = _split_outputs(x, splits, out)
    track = finite is not None and splits == 1
    (_SVGD if dist is None else _SVGD_GRAM).launch(
        lambda meta: (cdiv(n, meta["BLOCK_M"]), cdiv(d, block_v), splits),
        tile=tile,
        x_ptr=x,
        score_ptr=score,
        centring_ptr=centred,
        spread_ptr=spread,
        h_ptr=h,
        dist_ptr=dist if dist is not None else x,
        out_ptr=partial,
        rowsum_ptr=rowsums,
        finite_ptr=finite if track else rowsums,
        n=n,
        d=d,
        stride_x=x.stride(0),
        stride_score=score.stride(0),
        stride_dist=n,
        stride_out=out.stride(0),
        DIST_GIVEN=dist is not None,
        FINALIZE=splits == 1,
        TRACK_FINITE=track,
        BLOCK_D=next_power_of_2(d, low=MIN_BLOCK, high=64),
        BLOCK_V=block_v,
        ACC=tl_dtype(acc),
        MODE=mode,
    )
    if splits > 1:
        _combine(partial, rowsums, x, score, centred, spread, h, out, splits, block_v, mode)
    return out, track


def _forward(x, score, bandwidth, *, algorithm, allow_tf32, splits, tile, out=None, finite=None):
    """svgd_step_forward into out (or a new tensor); returns (phi, whether finite was tracked: see _apply)."""
    check_rows("x", x)
    check_rows("score", score)
    check_like("x", x, "score", score)
    if score.shape != x.shape:
        raise ValueError(f"score must have the shape of x {tuple(x.shape)}, got {tuple(score.shape)}")
    check_device(x)
    n = x.shape[0]
    mode = dot_mode(x.dtype, allow_tf32)
    gram = use_gram(n, algorithm)
    dist = None
    if gram:
        centred, dist = gram_centring_and_sq_dists(x, mode, splits=splits, tile=tile)
        if bandwidth is None:
            bandwidth = reference.bandwidth_from_median(gram_median(dist), n)
    else:
        centred = centring(x)
        if bandwidth is None:
            median, _ = median_sq_dist(x, centred[SHIFT], mode, algorithm, splits=splits, tile=tile)
            bandwidth = reference.bandwidth_from_median(median, n)
    h = check_bandwidth(bandwidth, x)  # dist stays float64: the kernel rounds it as it reads it
    return _apply(x, score, centred, h, dist, mode=mode, splits=None if gram else splits, tile=tile, out=out,
                  finite=finite)  # fmt: skip


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
    return _forward(x, score, bandwidth, algorithm=algorithm, allow_tf32=allow_tf32, splits=splits, tile=tile)[0]


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


@torch.library.custom_op("bmt_fast_triton::svgd_step_into", mutates_args=("out",))
def svgd_step_into(
    x: torch.Tensor,
    score: torch.Tensor,
    out: torch.Tensor,
    bandwidth: torch.Tensor | None = None,
    algorithm: str = "auto",
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    """svgd_step written into out (x's shape, dtype and device; contiguous), and a 0-dim bool tensor on x's
    device: whether every value of phi is finite. The single-pass kernels (one column split: the Gram path,
    and the tiled one when its columns are not split) note it as they store phi; elsewhere out is scanned."""
    check_out(out, x, score)
    if bandwidth is not None and overlaps(bandwidth, out):
        bandwidth = bandwidth.clone()  # the kernels read H while other programs write phi over it
    finite = torch.ones((), dtype=torch.uint8, device=x.device)
    x, score = x.contiguous(), score.contiguous()
    _, tracked = _forward(x, score, bandwidth, algorithm=algorithm, allow_tf32=allow_tf32, splits=None, tile=None,
                          out=out, finite=finite)  # fmt: skip
    return finite.view(torch.bool) if tracked else torch.isfinite(out).all()


@svgd_step_into.register_fake
def _(x, score, out, bandwidth=None, algorithm="auto", allow_tf32=None):
    check_out(out, x, score)
    use_gram(1, algorithm)
    return x.new_empty((), dtype=torch.bool)


@svgd_step.register_fake
def _(x, score, bandwidth=None, algorithm="auto", allow_tf32=None):
    check_rows("x", x)
    check_rows("score", score)
    check_like("x", x, "score", score)
    torch._check(score.shape == x.shape, lambda: f"score must have the shape of x {tuple(x.shape)}")
    use_gram(1, algorithm)
    return torch.empty_like(x, memory_format=torch.contiguous_format)
