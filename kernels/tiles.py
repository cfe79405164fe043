"""On-chip building blocks shared by the kernels: operand rounding for the dot precision modes, the dot
itself, and one tile of squared distances between centred rows.

Numerics (the same as bmt_fast.reference and the C++ kernels):
  * rows are centred by a shift vector c (kernels/centring.py) before the norm expansion
    |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, so large offsets do not cancel;
  * in the modes that round the operands (TF32, single half product) the norms are taken of exactly the
    rounded values the dot sees, so identical rows still give ~0 and the error is that of the rounding;
  * distances are clamped at +0 (never -0: the median selects on the bit patterns), a NaN kept (a NaN
    particle's entries of K are NaN, as the reference's: a GPU's max returns the number beside a NaN), and
    the diagonal of a self-distance tile is an exact 0.
"""

import triton
import triton.language as tl

from .utils import DOT_HALF, DOT_HALF_SPLIT, DOT_TF32, INTERPRETING

MODE_TF32: tl.constexpr = tl.constexpr(DOT_TF32)
MODE_HALF: tl.constexpr = tl.constexpr(DOT_HALF)
MODE_HALF_SPLIT: tl.constexpr = tl.constexpr(DOT_HALF_SPLIT)
# The interpreter multiplies half-precision dots wrongly; there the half operands are widened back to
# fp32 (products of two bf16/fp16 values are exact in fp32, so this is the tensor-core arithmetic).
INTERPRET: tl.constexpr = tl.constexpr(INTERPRETING)
# The half-precision products are bf16 for bf16 and fp16 inputs alike: bf16 has the range of fp32, so
# W = score - (2/H) xc and grad * K cannot overflow as they could in fp16, and hi + lo (16 bits) still
# holds an fp16 input (11 bits) exactly. Tensor cores multiply both types at the same rate.
HALF: tl.constexpr = tl.bfloat16


@triton.jit
def to_half(t):
    """fp32 t rounded to HALF (bf16) to nearest, ties to even, as a GPU converts it. Triton's interpreter
    truncates instead (its own round-to-nearest drops the carry into the exponent): there the bits are
    rounded here, so the interpreter's results carry the GPU's rounding errors, not twice them."""
    if INTERPRET:
        bits = t.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        t = tl.where(t == t, rounded, t)  # (a NaN as it is)
    return t.to(HALF)


@triton.jit
def to_output(t, DTYPE: tl.constexpr):
    """t converted to an output dtype, bf16 rounded to nearest in the interpreter too (to_half)."""
    if DTYPE == tl.bfloat16:
        return to_half(t.to(tl.float32))
    else:
        return t.to(DTYPE)


@triton.jit
def dot_operand(t, MODE: tl.constexpr):
    """t (fp32/fp64) rounded to what the dot multiplies in the rounding modes, kept in t's dtype."""
    if MODE == MODE_TF32:
        # Round to nearest (ties away) at TF32's 10 explicit mantissa bits: the 13 low bits go. A NaN stays
        # itself: the carry of a NaN with a full mantissa (0x7FFFFFFF, a GPU's canonical NaN) runs into the
        # sign bit and had made it -0.0, a finite distance for a NaN particle.
        bits = t.to(tl.uint32, bitcast=True)
        t = tl.where(t == t, ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True), t)
    elif MODE == MODE_HALF:
        t = to_half(t).to(t.dtype)
    return t


@triton.jit
def half_operand(t):
    """t (exactly representable in HALF) as the tensor cores take it."""
    if INTERPRET:
        return t.to(HALF).to(tl.float32)
    else:
        return t.to(HALF)


@triton.jit
def half_dot(a, b, acc):
    """acc + a @ b for operands from half_operand (input_precision only concerns fp32 operands)."""
    if INTERPRET:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def dot_acc(a, b, acc, MODE: tl.constexpr):
    """acc + a @ b (fp32 or fp64 operands, already passed through dot_operand).

    MODE_HALF_SPLIT: each operand is split into hi + lo in bf16 (hi = bf16(t), lo = bf16(t - hi)) and
    a @ b = (hi + lo)(hi' + lo') in four bf16 products on the tensor cores, fp32 accumulation: the product of
    the operands kept to 16 bits, exactly (each bf16 product is exact in fp32). The lo lo' term, 2^-16 of a
    product, was dropped until 2026-12-07: a distance then carried 2^-16 |x - c|^2, which on tight clusters far
    apart (distances 1e-4 of |x - c|^2) left phi 0.25 - 0.46 off (fp16's default); now the operands' own
    16-bit rounding, a distance error of about 2^-16 |x_i - x_j| |x - c|.
    """
    if MODE == MODE_HALF_SPLIT:
        a_hi = to_half(a).to(tl.float32)
        b_hi = to_half(b).to(tl.float32)
        a_lo = half_operand(to_half(a - a_hi))
        b_lo = half_operand(to_half(b - b_hi))
        a_hi = half_operand(a_hi)
        b_hi = half_operand(b_hi)
        acc = half_dot(a_lo, b_lo, acc)  # small terms first
        acc = half_dot(a_hi, b_lo, acc)
        acc = half_dot(a_lo, b_hi, acc)
        return half_dot(a_hi, b_hi, acc)
    elif MODE == MODE_HALF:
        return half_dot(half_operand(a), half_operand(b), acc)
    elif MODE == MODE_TF32 and not INTERPRET:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        # out_dtype = the accumulator's: the compiler refuses an fp64 accumulator with the default fp32
        # out_dtype (the interpreter does not check it).
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)


@triton.jit
def operand_sq_norms(a, MODE: tl.constexpr, acc):
    """acc + the squared norms of a's rows (from dot_operand) as dot_acc multiplies a row by itself: in split
    mode those of hi + lo, added to acc in dot_acc's order (lo lo, hi lo, lo hi, hi hi: a copy's norm and its
    dot product with itself then round alike, and copies are at distance ~0 across the d chunks too);
    otherwise of a itself. Taken of the exact operand, identical rows had a distance of 2 |lo|^2 in split mode
    (fp16's default: K 0.93 for two copies at H = 1)."""
    if MODE == MODE_HALF_SPLIT:
        hi = to_half(a).to(a.dtype)
        lo = to_half(a - hi).to(a.dtype)
        cross = tl.sum(hi * lo, axis=1)
        return (((acc + tl.sum(lo * lo, axis=1)) + cross) + cross) + tl.sum(hi * hi, axis=1)
    else:
        return acc + tl.sum(a * a, axis=1)


@triton.jit
def load_bandwidth(h_ptr, ACC: tl.constexpr):
    """H (one value of any float dtype, utils.check_bandwidth's) in ACC, NaN unless positive and finite
    (utils.valid_bandwidth's rule, applied where it is read: no launches of its own). Tested in H's own dtype:
    a float64 H past fp32's range (1e39: K = 1 to fp32's precision) is FLT_MAX in fp32, not the +inf of a
    cast, which the test had taken for an invalid H (all NaN); one that is 0 in ACC (1e-60) stays invalid."""
    h = tl.load(h_ptr)
    valid = (h > 0.0) & (h < float("inf"))
    if ACC == tl.float32:
        h = tl.minimum(h, 3.4028234663852886e38)
    h = h.to(ACC)
    return tl.where(valid & (h > 0.0), h, float("nan"))


@triton.jit
def load_centred(ptr, shift_ptr, rows, cols, n_rows, n_cols, stride, ACC: tl.constexpr):
    """ptr[rows, cols] - shift[cols] in ACC, zero outside the (n_rows, n_cols) matrix."""
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    values = tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(ACC)
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
    return tl.where(mask, values - shift[None, :], 0.0)


@triton.jit
def sq_dist_tile(
    a_ptr,
    b_ptr,
    shift_ptr,
    rows,
    cols,
    n_a,
    n_b,
    d,
    stride_a,
    stride_b,
    SELF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    MODE: tl.constexpr,
):
    """|a_i - b_j|^2 for i in rows, j in cols: a (BLOCK_M, BLOCK_N) tile in ACC, d looped in BLOCK_D chunks.

    SELF: a and b are the same rows (zero diagonal). Entries outside the matrices are meaningless; callers
    mask them.
    """
    dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    norm_a = tl.zeros((BLOCK_M,), dtype=ACC)
    norm_b = tl.zeros((BLOCK_N,), dtype=ACC)
    for k0 in range(0, d, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        a = dot_operand(load_centred(a_ptr, shift_ptr, rows, ks, n_a, d, stride_a, ACC), MODE)
        b = dot_operand(load_centred(b_ptr, shift_ptr, cols, ks, n_b, d, stride_b, ACC), MODE)
        norm_a = operand_sq_norms(a, MODE, norm_a)
        norm_b = operand_sq_norms(b, MODE, norm_b)
        dots = dot_acc(a, tl.trans(b), dots, MODE)
    d2 = norm_a[:, None] + norm_b[None, :] - 2.0 * dots
    d2 = tl.maximum(d2, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if SELF:
        d2 = tl.where(rows[:, None] == cols[None, :], 0.0, d2)
    return d2
