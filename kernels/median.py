"""The median-rule bandwidth H = median(all n*n squared distances) / log(n + 1) on the GPU, exactly.

Few particles (the Gram regime): the n x n distances are tiny; their numpy.median is found by counting ranks
(gram.gram_median: every distance tested against all n^2, on the device, in two small kernels).
Many particles: radix selection on the bit patterns of the distances (non-negative floats order like their
bits). Each pass recomputes every distance tile on chip (never n x n in memory) and histograms the next
11-bit digit of the distances whose higher bits match the prefix selected so far, for the two middle
ranks of the numpy.median convention at once. 31 key bits take 3 passes for fp32 (63 bits, 6 passes, for
fp64). The result is exact: the selected values are the very distances the SVGD kernel computes, so the
error against the float64 reference is that of the fp32 distances alone (the tests bound it). The cost is
3 (6) distance passes of 2 n^2 d FLOPs; bmt_fast.median_bandwidth(method="sampled") is the cheap estimate.
The prefix and ranks stay on the device: no host sync between passes.
"""

import math

import torch
import triton
import triton.language as tl

from bmt_fast import reference

from .centring import centring_shift
from .gram import gram_centring_and_sq_dists, gram_median
from .tiles import sq_dist_tile
from .utils import (
    MIN_BLOCK,
    Kernel,
    TileConfig,
    accumulation_dtype,
    cdiv,
    check_device,
    check_rows,
    dot_mode,
    ensure_contiguous,
    next_power_of_2,
    num_programs_target,
    tl_dtype,
)

DIGIT_BITS = 11
# Largest n served by the Gram path when algorithm="auto": the "few particles" regime (n <= ~256),
# not a measured crossover: the H200 rows in benchmarks/results cover n <= 64 (Gram) and n >= 1024 (tiled)
# only; to be set from rows in between.
GRAM_MAX_PARTICLES = 256


@triton.jit
def _radix_histogram_kernel(
    x_ptr,
    shift_ptr,
    prefix_ptr,
    hist_ptr,
    n,
    d,
    stride_x,
    col_blocks_per_split,
    DIGIT_SHIFT: tl.constexpr,
    WIDTH: tl.constexpr,
    KEY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    MODE: tl.constexpr,
):
    """hist[t, digit] += #{(i, j): key(d2_ij) >> (DIGIT_SHIFT + WIDTH) == prefix[t]} per digit, t = 0, 1."""
    BINS: tl.constexpr = 1 << WIDTH
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    j_start = tl.program_id(1) * col_blocks_per_split * BLOCK_N
    j_end = tl.minimum(n, j_start + col_blocks_per_split * BLOCK_N)
    prefix_lo = tl.load(prefix_ptr).to(KEY)
    prefix_hi = tl.load(prefix_ptr + 1).to(KEY)
    hist_lo = tl.zeros((BINS,), dtype=tl.int32)
    hist_hi = tl.zeros((BINS,), dtype=tl.int32)
    for j0 in range(j_start, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        d2 = sq_dist_tile(
            x_ptr, x_ptr, shift_ptr, rows, cols, n, n, d, stride_x, stride_x, True, BLOCK_M, BLOCK_N, BLOCK_D, ACC, MODE
        )
        keys = tl.reshape(d2.to(KEY, bitcast=True), (BLOCK_M * BLOCK_N,))
        valid = tl.reshape((rows < n)[:, None] & (cols < j_end)[None, :], (BLOCK_M * BLOCK_N,))
        high = keys >> (DIGIT_SHIFT + WIDTH)
        digit = ((keys >> DIGIT_SHIFT) & (BINS - 1)).to(tl.int32)
        hist_lo += tl.histogram(digit, BINS, mask=valid & (high == prefix_lo))
        hist_hi += tl.histogram(digit, BINS, mask=valid & (high == prefix_hi))
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + bins, hist_lo.to(tl.int64))
    tl.atomic_add(hist_ptr + BINS + bins, hist_hi.to(tl.int64))


# Fixed tile on every device: the histogram is accumulated with atomics, so autotuning (which re-runs a
# kernel) would count twice.
_RADIX = Kernel(_radix_histogram_kernel, fixed=TileConfig(64, 64, 4, 2))


def _radix_passes(key_bits: int) -> list[tuple[int, int]]:
    """(shift, width) of each digit, most significant first."""
    passes, fixed = [], 0
    while fixed < key_bits:
        width = min(DIGIT_BITS, key_bits - fixed)
        passes.append((key_bits - fixed - width, width))
        fixed += width
    return passes


def _select_digit(hist: torch.Tensor, ranks: torch.Tensor, prefix: torch.Tensor, width: int):
    """The bin holding each rank, the rank within it, and the longer prefix (all on the device)."""
    counts = hist.cumsum(1)
    digit = (counts <= ranks[:, None]).sum(1).clamp_max_(hist.shape[1] - 1)
    below = torch.where(digit > 0, counts.gather(1, (digit - 1).clamp_min(0)[:, None]).squeeze(1), 0)
    return ranks - below, (prefix << width) | digit


def median_sq_dist_tiled(
    x: torch.Tensor, shift: torch.Tensor, mode: int, *, splits: int | None = None, tile: TileConfig | None = None
) -> torch.Tensor:
    """numpy.median of all n*n squared distances of contiguous rows x, as a float64 0-dim tensor."""
    n, d = x.shape
    acc = accumulation_dtype(x.dtype)
    tile = tile or _RADIX.fixed
    key_bits, key_dtype, int_dtype = (63, tl.uint64, torch.int64) if acc == torch.float64 else (31, tl.uint32, torch.int32)
    row_blocks, col_blocks = cdiv(n, tile.block_m), cdiv(n, tile.block_n)
    if splits is None:
        splits = max(1, min(num_programs_target(x.device) // row_blocks, cdiv(col_blocks, 4)))
    per_split = cdiv(col_blocks, splits)
    total = n * n
    # The two middle ranks of the numpy convention (equal for odd n*n); made on the device, not copied from
    # the host, so the whole selection can be captured in a CUDA graph.
    ranks = torch.full((2,), total // 2, dtype=torch.int64, device=x.device)
    ranks[:1].fill_((total - 1) // 2)
    prefix = torch.zeros(2, dtype=torch.int64, device=x.device)
    for digit_shift, width in _radix_passes(key_bits):
        hist = torch.zeros((2, 1 << width), dtype=torch.int64, device=x.device)
        _RADIX.launch(
            lambda meta: (row_blocks, cdiv(col_blocks, per_split)),
            tile=tile,
            x_ptr=x,
            shift_ptr=shift,
            prefix_ptr=prefix,
            hist_ptr=hist,
            n=n,
            d=d,
            stride_x=x.stride(0),
            col_blocks_per_split=per_split,
            DIGIT_SHIFT=digit_shift,
            WIDTH=width,
            KEY=key_dtype,
            BLOCK_D=next_power_of_2(d, low=MIN_BLOCK, high=64),
            ACC=tl_dtype(acc),
            MODE=mode,
        )
        ranks, prefix = _select_digit(hist, ranks, prefix, width)
    middle = prefix.to(int_dtype).view(acc).double()
    return middle.mean()


def median_sq_dist(
    x: torch.Tensor, shift: torch.Tensor | None, mode: int, algorithm: str, *, splits: int | None = None,
    tile: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(median as float64 0-dim, the n x n distances when the Gram path computed them, else None). NaN where
    the particles hold NaN or Inf, as the reference's and the compiled backends' median, where the
    distances' clamp at 0 (a GPU's max returns the number beside a NaN) and the radix keys' order had given
    a finite median: the Gram path's distances carry the NaN (told from the Gram diagonal, no extra launch:
    the prompt regime's step is a few launches); the radix path tests the centring shift (x_0 plus a mean,
    not finite then) and the centred rows' squared norms (_norms_fit: one pass over x in row blocks), a few
    small torch ops beside its passes over n^2 distances. No host sync. shift: the
    radix path's centring shift where the caller has it (None: made here); the Gram path makes its own
    (gram_centring_and_sq_dists)."""
    if use_gram(x.shape[0], algorithm):
        _, dist = gram_centring_and_sq_dists(x, mode, splits=splits, tile=tile)
        return gram_median(dist), dist
    shift = centring_shift(x) if shift is None else shift
    median = median_sq_dist_tiled(x, shift, mode, splits=splits, tile=tile)
    return torch.where(torch.isfinite(shift).all() & _norms_fit(x, shift), median, math.nan), None


def _norms_fit(x: torch.Tensor, shift: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Whether every centred row's squared norm is finite in the shift's dtype (0-dim bool on the device: no host
    sync), as the compiled backends and the reference count an overflow (|x - shift| past ~1e19 in fp32): the
    radix keys had ranked the +inf distances as the largest values and given a finite median (fp32, a row
    at 3e19 among 257: the floor 1e-12). Row blocks bound the temporary to `rows` x d (default: 2^22 values).
    A distance that overflows between rows whose norms fit (two rows at +-1.3e19) is not caught here."""
    rows = max(1, (1 << 22) // max(x.shape[1], 1)) if rows is None else rows
    fit = torch.ones((), dtype=torch.bool, device=x.device)
    for r0 in range(0, x.shape[0], rows):
        centred = x[r0 : r0 + rows].to(shift.dtype) - shift
        fit = fit & torch.isfinite(centred.square_().sum(1)).all()
    return fit


def use_gram(n: int, algorithm: str) -> bool:
    if algorithm not in ("auto", "tiled", "gram"):
        raise ValueError(f'algorithm must be "auto", "tiled" or "gram", got {algorithm!r}')
    if algorithm == "gram" and n > GRAM_MAX_PARTICLES:
        # (its n x n distances and the rank selection over them are made for a few particles: past 46,340
        # rows their offsets would wrap 32 bits, and the selection's work grows as n^4)
        raise ValueError(f'algorithm="gram" takes at most {GRAM_MAX_PARTICLES} particles (rows), got {n}')
    return algorithm == "gram" or (algorithm == "auto" and n <= GRAM_MAX_PARTICLES)


@ensure_contiguous
def median_bandwidth_forward(
    x: torch.Tensor, *, algorithm: str = "auto", allow_tf32: bool | None = None, splits: int | None = None, tile: TileConfig | None = None
) -> torch.Tensor:
    """H = median / log(n + 1), floored, as a 0-dim tensor in x's accumulation dtype."""
    check_rows("x", x)
    check_device(x)
    mode = dot_mode(x.dtype, allow_tf32)
    median, _ = median_sq_dist(x, None, mode, algorithm, splits=splits, tile=tile)
    return reference.bandwidth_from_median(median, x.shape[0]).to(accumulation_dtype(x.dtype))


@torch.library.custom_op("bmt_fast_triton::median_bandwidth", mutates_args=())
def median_bandwidth(x: torch.Tensor, algorithm: str = "auto", allow_tf32: bool | None = None) -> torch.Tensor:
    """Exact median-rule bandwidth of rows x (n, d); see the module docstring."""
    return median_bandwidth_forward(x, algorithm=algorithm, allow_tf32=allow_tf32)


@median_bandwidth.register_fake
def _(x, algorithm="auto", allow_tf32=None):
    check_rows("x", x)
    use_gram(1, algorithm)
    return x.new_empty((), dtype=accumulation_dtype(x.dtype))
