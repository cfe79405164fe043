"""The centring shift c = x[0] + mean_i(x_i - x[0]) of bmt_fast.reference.centre, in one pass over x.

Subtracting x[0] first makes identical particles give exact zeros; the kernels subtract c on load, so no
centred copy of x is ever written.
"""

import torch
import triton
import triton.language as tl

from .utils import accumulation_dtype, cdiv, next_power_of_2, num_programs_target, tl_dtype


@triton.jit
def _centring_sum_kernel(
    x_ptr, partial_ptr, n, d, stride_x, rows_per_split, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    FINAL: tl.constexpr, ROUND: tl.constexpr,
):  # fmt: skip
    """partial[s, cols] = sum over this split's rows of (x[row, cols] - x[0, cols]), in ACC; FINAL (one split):
    the shift itself, x[0, cols] + that sum / n, rounded to x's dtype and back where ROUND."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    col_ok = cols < d
    first = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    total = tl.zeros((BLOCK_D,), dtype=ACC)
    row_end = tl.minimum(n, (split + 1) * rows_per_split)
    for r0 in range(split * rows_per_split, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        values = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        total += tl.sum(tl.where(mask, values - first[None, :], 0.0), axis=0)
    if FINAL:
        total = first + total / n
        if ROUND:
            total = total.to(x_ptr.dtype.element_ty, fp_downcast_rounding="rtne").to(ACC)
    tl.store(partial_ptr + split * d + cols, total, mask=col_ok)


def centring_shift(x: torch.Tensor, *, splits: int | None = None) -> torch.Tensor:
    """c (d,) in x's accumulation dtype for contiguous rows x (n, d); for bf16/fp16 x, c is rounded to x's
    dtype. splits: force the number of row ranges (tests); None = chosen for the device."""
    n, d = x.shape
    acc = accumulation_dtype(x.dtype)
    block_d = next_power_of_2(d, low=64, high=256)
    block_r = 64
    col_blocks = cdiv(d, block_d)
    if splits is None:
        splits = max(1, min(num_programs_target(x.device) // col_blocks, cdiv(n, 4 * block_r)))
    rows_per_split = cdiv(cdiv(n, splits), block_r) * block_r
    splits = cdiv(n, rows_per_split)
    partial = torch.empty((splits, d), dtype=acc, device=x.device)
    # One split (up to 256 particles: the prompt regime, where a whole GPU step is a few launches): the
    # kernel writes the shift itself, without three to five small torch launches after it.
    final = splits == 1
    _centring_sum_kernel[(col_blocks, splits)](
        x, partial, n, d, x.stride(0), rows_per_split, ACC=tl_dtype(acc), BLOCK_R=block_r, BLOCK_D=block_d,
        FINAL=final, ROUND=x.dtype != acc,
    )  # fmt: skip
    if final:
        return partial[0]
    shift = x[0].to(acc) + partial.sum(0) / n
    if x.dtype != acc:
        # A shift in the input dtype: x - shift is then exact in fp32 (both are bf16/fp16 values of close
        # exponents), and fits the two half-dtype parts of the split dot exactly as long as the half dtype
        # resolves the spread of the particles at all. Any shift leaves the results unchanged in exact
        # arithmetic (translation invariance); identical particles still give exact zeros.
        shift = shift.to(x.dtype).to(acc)
    return shift
