"""The Triton median-rule bandwidth: exact radix selection (many particles) and the Gram path (few)."""

import math

import pytest
import torch
from helpers import relative_error
from triton_helpers import DEVICE, kernels, requires_gpu, requires_triton

import bmt_fast
from bmt_fast import reference

pytestmark = requires_triton

ALGORITHMS = ["tiled", "gram"]


def symmetric_integer_cloud(n, d, dtype):
    """Pairs of rows +-v (plus a zero row for odd n) with small integer entries, shuffled: the centring
    shift is exactly 0 (integer sums are exact) and every squared distance is an exact small integer, so
    a correct selection gives exactly the reference median, including its many ties."""
    half = torch.randint(-3, 4, (n // 2, d), dtype=torch.float64)
    x = torch.cat([half, -half, torch.zeros(n % 2, d, dtype=torch.float64)])
    return x[torch.randperm(n)].to(dtype).to(DEVICE)


def median_of(x, algorithm, **options):
    mode = kernels().utils.dot_mode(x.dtype, None)
    shift = kernels().centring.centring_shift(x)
    median, _ = kernels().median.median_sq_dist(x, shift, mode, algorithm, **options)
    return median


@pytest.mark.parametrize("n", [1, 2, 3, 16, 45])
def test_gram_median_is_numpys(n):
    """The Gram path's rank-counting median of an n x n matrix equals numpy.median bit for bit: odd and even
    counts (n*n), many ties (small integers, a zero diagonal), both middle values inside one run of ties or
    across two, and NaN anywhere gives NaN (as numpy.median)."""
    import numpy as np

    gram_median = kernels().gram.gram_median
    torch.manual_seed(n)
    for spread in (2, 5, 1000):
        d = torch.randint(0, spread, (n, n)).double()
        d = (d + d.T).fill_diagonal_(0.0) * 0.37
        got = gram_median(d.to(DEVICE))
        assert got.dtype == torch.float64 and got.shape == ()
        assert float(got) == float(np.median(d.numpy())), (spread, float(got))
    d = torch.rand(n, n, dtype=torch.float64)
    d[n // 2, n - 1] = math.nan
    assert math.isnan(float(gram_median(d.to(DEVICE))))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_median_of_particles_with_nan_or_inf_is_nan(algorithm, dtype):
    """A NaN or an infinity in the particles (at x_0, the last value or the middle) makes H NaN, as the
    reference's and the CPU's: the radix selection had ranked NaN keys above every number (distances
    clamped at 0) and returned a finite median."""
    n, d = 20, 16
    x = torch.randn(n, d, dtype=torch.float64).to(dtype).to(DEVICE)
    forward = kernels().median.median_bandwidth_forward
    assert math.isfinite(float(forward(x, algorithm=algorithm)))
    for (i, k), bad in zip([(0, 0), (n - 1, d - 1), (n // 2, d // 2)], [math.nan, math.inf, -math.inf]):
        xb = x.clone()
        xb[i, k] = bad
        assert math.isnan(float(forward(xb, algorithm=algorithm))), (i, k, bad)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_median_of_particles_whose_squared_norms_overflow_is_nan(algorithm):
    """Finite fp32 particles, one row at 3e19: its squared distances overflow fp32, which the reference and the
    compiled backends count as not finite (H NaN). The radix selection (tiled) had ranked the +inf distances as
    the largest keys and returned the floor 1e-12 (257 rows); a row block boundary is crossed too (_norms_fit)."""
    x = torch.randn(20, 4).to(DEVICE)
    x[5] = 3e19
    forward = kernels().median.median_bandwidth_forward
    assert math.isnan(float(forward(x, algorithm=algorithm)))
    if algorithm == "tiled":
        shift = kernels().centring.centring_shift(x)
        assert bool(kernels().median._norms_fit(x[:5], shift, rows=2))
        assert not bool(kernels().median._norms_fit(x, shift, rows=2))  # (row 5: the third block)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("n", [1, 20])
def test_gpu_nan_under_tf32_rounding_stays_nan(algorithm, n):
    """A GPU's canonical NaN (0x7FFFFFFF: a full mantissa) in fp32 particles with TF32 products: the operands'
    rounding to TF32 carried it into the sign bit and made it -0.0, so the distances of a NaN particle were
    finite (K finite where the reference's is NaN, on the Gram path a finite median). Written as bits: the
    interpreter's own arithmetic makes x86's NaN (0xFFC00000), which the rounding kept."""
    d = 16
    x = torch.randn(n, d, dtype=torch.float32)
    x.view(torch.int32)[n // 2, 3] = 0x7FFFFFFF
    x = x.to(DEVICE)
    assert torch.isnan(x).sum() == 1
    h = kernels().median.median_bandwidth_forward(x, algorithm=algorithm, allow_tf32=True)
    assert math.isnan(float(h))
    k = kernels().rbf_kernel.rbf_kernel_forward(x, x, torch.tensor(2.0, device=DEVICE), allow_tf32=True)
    assert torch.isnan(k).all(), k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,splits", [(1, 1), (7, 1), (130, 1), (130, 2), (300, 3)])
@pytest.mark.parametrize("offset", [100.0, 0.0])
def test_centring_in_one_kernel_and_over_row_splits(dtype, n, splits, offset):
    """One row range: the kernel writes the result itself; several: a second kernel adds their sums and
    ranges. The centre is the mean of the rows (rounded to x's dtype for bf16: to nearest, the interpreter
    too), the spread each column's largest |x - centre|, and the distances' shift the centre but for bf16,
    whose shift leaves every x - shift a bf16 value (a multiple of the spacing at the column's largest |x|
    near the mean where the column has one sign, else 0); x[0] exactly for identical particles."""
    x = (torch.randn(n, 300, dtype=torch.float64) * 3 + offset).to(dtype).to(DEVICE)
    centring = kernels().centring
    result = centring.centring(x, splits=splits)
    shift, centre, spread = result
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert result.dtype == acc and result.shape == (3, 300)
    assert torch.equal(centring.centring_shift(x, splits=splits), shift)
    expected = x.double().mean(0)
    if dtype == torch.bfloat16:
        assert (centre.double() - expected).abs().max() <= 2.0**-8 * expected.abs().max()  # half a spacing
        assert torch.equal(centre, centre.to(dtype).to(acc))  # a bf16 value
        shifted = x.to(acc) - shift
        assert torch.equal(shifted, shifted.to(dtype).to(acc))  # x - shift exact in bf16
        shifted_columns = shift != 0
        assert bool(((x.amin(0) > 0) | (x.amax(0) < 0))[shifted_columns].all())  # one sign
        near = (shift.double() - expected).abs() <= 2.0**-7 * x.abs().amax(0).double()
        assert bool(near[shifted_columns].all())
        assert bool(shifted_columns.all()) == (offset != 0.0 or n == 1)  # (around 100; at 0 some cross it)
    else:
        scale = float(x.abs().max())  # (the rounding of the sums is relative to the values, not to the mean)
        assert float((centre.double() - expected).abs().max()) < (1e-14 if dtype == torch.float64 else 1e-6) * scale
        assert torch.equal(shift, centre)
    assert torch.equal(spread, (x.to(acc) - centre).abs().amax(0))
    same = x[:1].expand(n, -1).contiguous()
    assert torch.equal(kernels().centring.centring_shift(same, splits=splits), same[0].to(acc))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 64, 65, 130])
def test_selects_the_exact_median_with_ties(algorithm, dtype, n):
    """n*n even (two middle ranks) and odd (one), one and several blocks of rows and columns."""
    x = symmetric_integer_cloud(n, 12, dtype)
    expected = reference.numpy_median(reference.pairwise_sq_dists(x.double()))
    assert float(median_of(x, algorithm)) == float(expected)


@pytest.mark.parametrize("splits", [2, 3])
def test_column_splits_count_every_pair_once(splits):
    x = symmetric_integer_cloud(130, 7, torch.float32)
    expected = reference.numpy_median(reference.pairwise_sq_dists(x.double()))
    assert float(median_of(x, "tiled", splits=splits)) == float(expected)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "dtype,allow_tf32,rel_tol",
    [
        (torch.float64, None, 1e-12),
        (torch.float32, None, 2e-6),
        (torch.bfloat16, False, 2e-6),  # fp32 products
        (torch.bfloat16, None, 2.0**-7),  # one product of centred rows rounded to bf16 (measured 1.7e-3)
        (torch.bfloat16, True, 2.0**-7),
        (torch.float16, None, 2e-5),  # four products of hi/lo bf16 parts (three, measured up to 9.1e-6)
    ],
)
@pytest.mark.parametrize("n,d", [(3, 3), (70, 37), (130, 129)])
def test_bandwidth_matches_reference(algorithm, dtype, allow_tf32, rel_tol, n, d):
    """Random clouds far from the origin, against the reference on the same (rounded) inputs."""
    x = (torch.randn(n, d, dtype=torch.float64) * 2 + 10).to(dtype).to(DEVICE)
    h = kernels().median_bandwidth_forward(x, algorithm=algorithm, allow_tf32=allow_tf32)
    assert h.dim() == 0 and h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = reference.median_bandwidth(x.double())
    assert math.isclose(float(h), float(expected), rel_tol=rel_tol)


def test_public_api_and_the_floor():
    x = torch.zeros(9, 3, dtype=torch.float64, device=DEVICE)
    x[7:] = torch.randn(2, 3, dtype=torch.float64)  # 49 of 81 pairs coincide: median 0, H at the floor
    assert float(bmt_fast.median_bandwidth(x, backend="triton")) == bmt_fast.BANDWIDTH_FLOOR
    y = torch.randn(300, 5, dtype=torch.float64, device=DEVICE)  # auto: the tiled path (n > 256)
    h = bmt_fast.median_bandwidth(y, backend="triton")
    assert math.isclose(float(h), float(reference.median_bandwidth(y)), rel_tol=1e-12)


def test_radix_digits_cover_every_key_bit():
    passes = kernels().median._radix_passes
    for key_bits in (31, 63):
        digits = passes(key_bits)
        assert sum(width for _, width in digits) == key_bits
        assert digits[-1][0] == 0 and all(s1 == s2 + w2 for (s1, _), (s2, w2) in zip(digits, digits[1:]))


def test_opcheck_and_bad_input():
    x = torch.randn(7, 3, device=DEVICE)
    for args in [(x,), (x, "tiled"), (x, "gram", True)]:
        torch.library.opcheck(torch.ops.bmt_fast_triton.median_bandwidth.default, args)
    with pytest.raises(ValueError, match="algorithm must be"):
        torch.ops.bmt_fast_triton.median_bandwidth(x, "sorted")
    with pytest.raises(ValueError, match="x must be a non-empty 2-D"):
        torch.ops.bmt_fast_triton.median_bandwidth(torch.randn(5, device=DEVICE))


@requires_gpu
def test_gpu_exact_for_many_particles():
    """n = 8192: radix selection over streamed tiles equals the sort of all 67M distances (fp64)."""
    x = torch.randn(8192, 16, dtype=torch.float64, device="cuda")
    h = bmt_fast.median_bandwidth(x, backend="triton")
    assert math.isclose(float(h), float(reference.median_bandwidth(x)), rel_tol=1e-12)
    h32 = bmt_fast.median_bandwidth(x.float(), backend="triton")
    assert math.isclose(float(h32), float(h), rel_tol=2e-6)
