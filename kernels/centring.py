"""The centring of bmt_fast.reference.centre, in one pass over x: per column the mean c = x[0] +
mean_i(x_i - x[0]), the variance, the range, and from them the shift the distances take and the spread of
the particles.

Subtracting x[0] first makes identical particles give exact zeros; the kernels subtract the shift on load,
so no centred copy of x is ever written.

bf16 particles are shifted exactly for the distances where that keeps the expansion well conditioned
(exact_bf16_shift, as the CPU's AMX path and the CUDA tiles): a multiple of the column's bf16 spacing at its
largest |x|, or 0, that leaves every x - shift a bf16 value, so the one bf16 product of the default mode
multiplies the particles' own bits. Their mean rounded to bf16 (the centre) had rounded x - centre to bf16
again wherever it was no smaller than x: two clusters 0.05 wide whose centres are drawn N(0, 10^2) per
feature gave K 4.5e-2 off. The step's W = score - (2/H)(x - centre) keeps the
centre (the mean: the smaller |x - centre|, the smaller W's rounding), and takes the spread, the largest
|x - centre|, to choose between folding and splitting W (kernels/svgd_step.py).
"""

import torch
import triton
import triton.language as tl

from .tiles import to_output
from .utils import accumulation_dtype, cdiv, next_power_of_2, num_programs_target, tl_dtype

# Rows of the (3, d) result of centring(): the distances' shift, the centre, the spread (host indices, and
# the same as constexprs for the kernels).
SHIFT, CENTRE, SPREAD = 0, 1, 2
SHIFT_ROW: tl.constexpr = tl.constexpr(SHIFT)
CENTRE_ROW: tl.constexpr = tl.constexpr(CENTRE)
SPREAD_ROW: tl.constexpr = tl.constexpr(SPREAD)


# The exact shifts' limits (exact_bf16_shift): one is taken only where it moves the column's values no
# farther from their mean than EXACT_RMS_RATIO times their root mean square deviation, and where no value
# ends farther from it than sqrt(EXACT_NORM_LIMIT / d) (the squared norms stay below 2^120: fp32's range).
EXACT_RMS_RATIO: tl.constexpr = tl.constexpr(4.0)
EXACT_NORM_LIMIT: tl.constexpr = tl.constexpr(1.329227995784916e36)


@triton.jit
def exact_bf16_shift(mean, var, lo, hi, centre, d):
    """A column's shift for the distances of bf16 values in [lo, hi] with this mean and variance (fp32), so
    that every x - shift is a bf16 value (the one bf16 product then multiplies the particles' own bits),
    where such a shift keeps the expansion |a|^2 + |b|^2 - 2 a.b as well conditioned as the centre does:
    (1) the mean rounded to a multiple of bf16's spacing at max(|lo|, |hi|), where every x - shift is then
    a multiple of x's spacing below |x| (one sign, lo > shift / 2 or hi < shift / 2); else (2) 0 (x itself);
    each only where |mean - shift| <= sqrt(EXACT_RMS_RATIO^2 - 1) sqrt(var) (the values' root mean square
    about the shift at most EXACT_RMS_RATIO times that about their mean) and max |x - shift|^2 d <=
    EXACT_NORM_LIMIT; else the centre (x - centre rounded to bf16, as before these shifts). Always taking
    0 where (1) failed had put a tight cloud far from 0 with one particle below half its mean uncentred into
    the expansion (K 0.1 off), and values {L, 3L} at L = 1e18 past fp32's range (NaN). A mean that is not
    finite (a NaN or Inf particle) is kept: the column stays flagged."""
    big = tl.maximum(tl.abs(lo), tl.abs(hi))
    usable = ((lo > 0.0) | (hi < 0.0)) & (big < float("inf")) & (big >= 1.1754943508222875e-38 * 256.0)
    # bf16's spacing at big: 2^(e - 7) for big in [2^e, 2^(e + 1)), from big's exponent bits (>= 2^-118 here)
    exponent = (big.to(tl.uint32, bitcast=True) & 0x7F800000).to(tl.int32)
    spacing = tl.where(usable, exponent - (7 << 23), 127 << 23).to(tl.float32, bitcast=True)
    rounded = tl.floor(mean / spacing + 0.5) * spacing  # (|mean / spacing| < 2^9: exact in fp32)
    exact = usable & tl.where(lo > 0.0, lo > 0.5 * rounded, hi < 0.5 * rounded)
    shift = tl.where(exact, rounded, 0.0)
    moved = mean - shift
    reach = tl.maximum(tl.abs(lo - shift), tl.abs(hi - shift))
    keep = (moved * moved <= var * (EXACT_RMS_RATIO * EXACT_RMS_RATIO - 1.0)) & (reach * reach * d <= EXACT_NORM_LIMIT)
    return tl.where(mean == mean, tl.where(tl.abs(mean) < float("inf"), tl.where(keep, shift, centre), mean), mean)


@triton.jit
def _finish(out_ptr, cols, col_ok, n, d, first, total, total_sq, lo, hi, ROUND: tl.constexpr, EXACT: tl.constexpr,
            DTYPE: tl.constexpr):  # fmt: skip
    """The three rows of centring()'s result for these columns from the sums of x - x[0] and of its squares
    (ACC) and the range."""
    offset = total / n
    mean = first + offset
    centre = mean
    if ROUND:
        centre = to_output(mean, DTYPE).to(mean.dtype)
    shift = centre
    if EXACT:
        var = tl.maximum(total_sq / n - offset * offset, 0.0)
        shift = exact_bf16_shift(mean.to(tl.float32), var.to(tl.float32), lo.to(tl.float32), hi.to(tl.float32),
                                 centre.to(tl.float32), d).to(mean.dtype)  # fmt: skip
    spread = tl.maximum(tl.abs(lo - centre), tl.abs(hi - centre))
    tl.store(out_ptr + SHIFT_ROW * d + cols, shift, mask=col_ok)
    tl.store(out_ptr + CENTRE_ROW * d + cols, centre, mask=col_ok)
    tl.store(out_ptr + SPREAD_ROW * d + cols, spread, mask=col_ok)


@triton.jit
def _centring_sum_kernel(
    x_ptr, partial_ptr, out_ptr, n, d, stride_x, rows_per_split, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr, FINAL: tl.constexpr, ROUND: tl.constexpr, EXACT: tl.constexpr,
):  # fmt: skip
    """For this split's rows and columns: the sums of (x[row, cols] - x[0, cols]) and of its squares and the
    least and largest value, in ACC, to partial[split] (4 rows of d); FINAL (one split): centring()'s result
    itself."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    col_ok = cols < d
    first = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    total = tl.zeros((BLOCK_D,), dtype=ACC)
    total_sq = tl.zeros((BLOCK_D,), dtype=ACC)
    lo = tl.full((BLOCK_D,), float("inf"), dtype=ACC)
    hi = tl.full((BLOCK_D,), -float("inf"), dtype=ACC)
    row_end = tl.minimum(n, (split + 1) * rows_per_split)
    for r0 in range(split * rows_per_split, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        values = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        deviation = tl.where(mask, values - first[None, :], 0.0)
        total += tl.sum(deviation, axis=0)
        total_sq += tl.sum(deviation * deviation, axis=0)
        lo = tl.minimum(lo, tl.min(tl.where(mask, values, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(mask, values, -float("inf")), axis=0))
    if FINAL:
        _finish(out_ptr, cols, col_ok, n, d, first, total, total_sq, lo, hi, ROUND, EXACT, x_ptr.dtype.element_ty)
    else:
        base = partial_ptr + split * 4 * d + cols
        tl.store(base, total, mask=col_ok)
        tl.store(base + d, total_sq, mask=col_ok)
        tl.store(base + 2 * d, lo, mask=col_ok)
        tl.store(base + 3 * d, hi, mask=col_ok)


@triton.jit
def _centring_finish_kernel(
    x_ptr, partial_ptr, out_ptr, n, d, splits, ACC: tl.constexpr, BLOCK_D: tl.constexpr, ROUND: tl.constexpr,
    EXACT: tl.constexpr,
):  # fmt: skip
    """centring()'s result from the row splits' partial sums and ranges (one launch instead of torch's)."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    total = tl.zeros((BLOCK_D,), dtype=ACC)
    total_sq = tl.zeros((BLOCK_D,), dtype=ACC)
    lo = tl.full((BLOCK_D,), float("inf"), dtype=ACC)
    hi = tl.full((BLOCK_D,), -float("inf"), dtype=ACC)
    for split in range(0, splits):
        base = partial_ptr + split * 4 * d + cols
        total += tl.load(base, mask=col_ok, other=0.0)
        total_sq += tl.load(base + d, mask=col_ok, other=0.0)
        lo = tl.minimum(lo, tl.load(base + 2 * d, mask=col_ok, other=0.0))
        hi = tl.maximum(hi, tl.load(base + 3 * d, mask=col_ok, other=0.0))
    first = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    _finish(out_ptr, cols, col_ok, n, d, first, total, total_sq, lo, hi, ROUND, EXACT, x_ptr.dtype.element_ty)


def centring(x: torch.Tensor, *, splits: int | None = None) -> torch.Tensor:
    """(3, d) in x's accumulation dtype for contiguous rows x (n, d): row SHIFT the distances' shift
    (exact_bf16_shift for bf16 x where it takes one, else the centre), row CENTRE the mean (rounded to x's
    dtype for bf16/fp16 x), row SPREAD each column's largest |x - centre|. splits: force the number of row
    ranges (tests); None = chosen for the device."""
    n, d = x.shape
    acc = accumulation_dtype(x.dtype)
    block_d = next_power_of_2(d, low=64, high=256)
    block_r = 64
    col_blocks = cdiv(d, block_d)
    if splits is None:
        splits = max(1, min(num_programs_target(x.device) // col_blocks, cdiv(n, 4 * block_r)))
    rows_per_split = cdiv(cdiv(n, splits), block_r) * block_r
    splits = cdiv(n, rows_per_split)
    out = torch.empty((3, d), dtype=acc, device=x.device)
    # One split (up to 256 particles: the prompt regime, where a whole GPU step is a few launches): the
    # kernel writes the result itself; several: one more launch sums their partial results.
    final = splits == 1
    partial = out if final else torch.empty((splits, 4, d), dtype=acc, device=x.device)
    # A shift and centre in the input dtype: x - shift is then exact in fp32 (both are bf16/fp16 values of
    # close exponents), and fits the two half-dtype parts of the split dot exactly as long as the half dtype
    # resolves the spread of the particles at all. Any shift leaves the results unchanged in exact arithmetic
    # (translation invariance); identical particles still give exact zeros.
    flags = {"ROUND": x.dtype != acc, "EXACT": x.dtype == torch.bfloat16}
    _centring_sum_kernel[(col_blocks, splits)](
        x, partial, out, n, d, x.stride(0), rows_per_split, ACC=tl_dtype(acc), BLOCK_R=block_r, BLOCK_D=block_d,
        FINAL=final, **flags,
    )  # fmt: skip
    if not final:
        _centring_finish_kernel[(col_blocks,)](
            x, partial, out, n, d, splits, ACC=tl_dtype(acc), BLOCK_D=block_d, **flags
        )  # fmt: skip
    return out


def largest_spread(centred: torch.Tensor) -> torch.Tensor:
    """The largest |x - centre| of all columns (0-dim, on the device: no host sync) from centring()'s result;
    NaN where a column's is."""
    return centred[SPREAD].amax()


def centring_shift(x: torch.Tensor, *, splits: int | None = None) -> torch.Tensor:
    """The distances' shift (d,) of centring(x)."""
    return centring(x, splits=splits)[SHIFT]
