"""The Triton SVGD step (both regimes) against the float64 reference; in the interpreter without a GPU."""

import math

import pytest
import torch
from helpers import assert_within, far_from_zero_bf16_particles, relative_error, torch_error_in
from triton_helpers import DEVICE, HAS_GPU, kernels, on_device, requires_gpu, requires_triton, rounded_product_ulps, ulp

import bmt_fast
from bmt_fast import reference

pytestmark = requires_triton

# (n, d) with edges that are not multiples of the 64-wide blocks: one row, one column, several row /
# column blocks (130), several d chunks and output chunks (129, 300).
SHAPES = [(1, 1), (3, 1), (7, 5), (70, 37), (130, 129), (13, 300)]
ALGORITHMS = ["tiled", "gram"]


def particles(n, d, *, offset=0.0, dtype=torch.float64):
    x = torch.randn(n, d, dtype=torch.float64) * 1.5 + offset
    score = torch.randn(n, d, dtype=torch.float64)
    return on_device(x.to(dtype), score.to(dtype))


def reference_phi(x, score, h=None):
    return reference.svgd_step(x.double(), score.double(), None if h is None else torch.as_tensor(h, dtype=torch.float64))


def svgd(x, score, h=None, **options):
    return kernels().svgd_step_forward(x, score, h, **options)


def test_host_launch_arithmetic_matches_triton():
    """The launchers' plain-Python cdiv and next_power_of_2 (triton.cdiv / triton.next_power_of_2 cost
    ~1.4 us a host call in Triton 3.x) give Triton's values, clamped as asked."""
    import triton

    utils = kernels().utils
    for a in [0, 1, 2, 15, 16, 17, 63, 64, 65, 1000, 409_600, 409_601, 2**31 + 5]:
        for b in [1, 2, 3, 16, 64, 100, 4096]:
            assert utils.cdiv(a, b) == triton.cdiv(a, b) == math.ceil(a / b), (a, b)
        if a >= 1:
            expected = triton.next_power_of_2(a)
            assert utils.next_power_of_2(a, low=1, high=2**40) == expected, a
            assert utils.next_power_of_2(a, low=64, high=256) == max(64, min(256, expected)), a
    assert utils.next_power_of_2(0, low=16, high=64) == 16


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_fp64_matches_reference(algorithm, n, d):
    x, score = particles(n, d)
    phi = svgd(x, score, algorithm=algorithm)
    assert phi.dtype == torch.float64 and phi.shape == (n, d)
    assert relative_error(phi, reference_phi(x, score)) < 1e-12


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("n,d", [(70, 37), (130, 129), (13, 300)])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_fp32_within_twice_torch_error(algorithm, n, d, offset):
    """IEEE fp32 distances and accumulation: the flash-attention tolerance rule, also far from the origin."""
    x64, score64 = (t.float().double() for t in particles(n, d, offset=offset))  # the fp32 inputs, exactly
    h = reference.median_bandwidth(x64)
    phi = svgd(x64.float(), score64.float(), h.float(), algorithm=algorithm)
    assert phi.dtype == torch.float32

    def centred_reference(x, s):  # torch's own fp32 error, measured where it is fair: near the origin
        return reference.svgd_step(x - x64[:1].to(x.dtype), s, h.to(x.dtype))

    torch_error = torch_error_in(torch.float32, centred_reference, x64, score64)
    assert_within(phi, reference_phi(x64, score64, h), torch_error)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_gram_regime_with_large_d_fp32(offset):
    """Few particles, d = 20,003 (split-K over d with fp64 sums of the chunks): 2x torch's fp32 error."""
    x64, score64 = (t.float().double() for t in particles(5, 20_003, offset=offset))
    h = reference.median_bandwidth(x64)
    phi = svgd(x64.float(), score64.float(), algorithm="gram", splits=4)
    torch_error = torch_error_in(
        torch.float32, lambda x, s: reference.svgd_step(x - x64[:1].to(x.dtype), s, h.to(x.dtype)), x64, score64
    )
    assert_within(phi, reference_phi(x64, score64, h), torch_error)


@pytest.mark.parametrize("algorithm,splits", [("tiled", 2), ("tiled", 3), ("gram", 3), ("gram", 5)])
def test_split_work_is_summed_exactly_once(algorithm, splits):
    """Column splits of the tiled path (partial sums + combine kernel) and split-K of the Gram path."""
    x, score = particles(200, 300 if algorithm == "gram" else 70)
    phi = svgd(x, score, algorithm=algorithm, splits=splits)
    assert relative_error(phi, reference_phi(x, score)) < 1e-12


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_median_rule_in_fp32(algorithm):
    x64, score64 = (t.float().double() for t in particles(70, 37, offset=3.0))
    phi = svgd(x64.float(), score64.float(), algorithm=algorithm)
    assert relative_error(phi, reference_phi(x64, score64)) < 2e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("allow_tf32", [None, False, True])
@pytest.mark.parametrize("n,d", [(70, 37), (66, 129)])  # tiled: the flash kernel, and d > FLASH_MAX_D
def test_half_precision_inputs(dtype, algorithm, allow_tf32, n, d):
    """bf16/fp16 in, fp32 accumulation, same dtype out. The split mode (four products of hi/lo bf16
    parts: fp16's default) and allow_tf32=False (fp32 products) leave only the final rounding: one ulp of
    the dtype. One bf16 product of rounded operands (bf16's default; allow_tf32=True) adds about 1.5 ulps
    of bf16 (measured), for fp16 inputs too."""
    x, score = particles(n, d, dtype=dtype)
    phi = svgd(x, score, algorithm=algorithm, allow_tf32=allow_tf32)
    assert phi.dtype == dtype
    error = relative_error(phi, reference_phi(x, score))
    assert error <= ulp(dtype) + rounded_product_ulps(dtype, allow_tf32, 2.0) * ulp(torch.bfloat16), error


@pytest.mark.parametrize("algorithm,n,d", [("gram", 13, 40), ("tiled", 70, 37), ("tiled", 66, 129)])
def test_bf16_inputs_take_one_bf16_product_by_default_and_fp16_three(algorithm, n, d):
    """bf16 inputs multiply as torch's bf16 matmuls and the CUDA kernels do (one product, fp32 sums):
    the default gives allow_tf32=True's phi bit for bit. fp16 inputs keep the split products (their
    11 bits would not survive one bf16 product): the default gives allow_tf32=False's accuracy."""
    utils = kernels().utils
    assert utils.dot_mode(torch.bfloat16, None) == utils.DOT_HALF
    assert utils.dot_mode(torch.float16, None) == utils.DOT_HALF_SPLIT
    x, score = particles(n, d, dtype=torch.bfloat16)
    assert torch.equal(svgd(x, score, algorithm=algorithm), svgd(x, score, algorithm=algorithm, allow_tf32=True))
    x, score = particles(n, d, dtype=torch.float16)
    assert relative_error(svgd(x, score, algorithm=algorithm), reference_phi(x, score)) <= ulp(torch.float16)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("allow_tf32", [None, True])
def test_fp16_products_cannot_overflow(algorithm, allow_tf32):
    """W = score - (2/H) xc exceeds the fp16 range (65504) here; the half products are bf16 (fp32's range)."""
    x = (torch.randn(70, 5, dtype=torch.float64) * 100).half().to(DEVICE)
    xc = x.double() - x.double().mean(0)
    score = (-6.5e4 * xc.sign()).half()  # |score - (2/H) xc| = 64992 + 4 |xc|
    h = torch.tensor(0.5, dtype=torch.float64, device=DEVICE)
    assert ((score.double() - 4.0 * xc).abs() > 65504).any()
    phi = svgd(x, score, h, algorithm=algorithm, allow_tf32=allow_tf32)
    assert torch.isfinite(phi).all()
    bound = ulp(torch.float16) + (2 * ulp(torch.bfloat16) if allow_tf32 else 0.0)
    assert relative_error(phi, reference_phi(x, score, h)) <= bound


# ---- svgd_step_into: phi into out, and whether it is all finite ------------------------------------


def into(x, score, h=None, algorithm="auto"):
    """torch.ops.bmt_fast_triton.svgd_step_into on a fresh out: (phi, finite)."""
    out = torch.full_like(x, 7.0)
    finite = torch.ops.bmt_fast_triton.svgd_step_into(x, score, out, h, algorithm)
    assert finite.dtype == torch.bool and finite.shape == () and finite.device == x.device
    return out, bool(finite)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("algorithm,n,d", [("gram", 1, 5), ("gram", 5, 37), ("gram", 13, 300), ("tiled", 70, 37)])
def test_svgd_step_into_writes_phi_and_reports_whether_it_is_finite(dtype, algorithm, n, d):
    """out receives svgd_step's phi bit for bit and the flag equals isfinite(phi).all(): noted by the kernel as
    it stores phi where one pass writes it (the Gram path), by a scan elsewhere. A NaN/Inf at the first row
    (the centring's anchor), the last value and the middle, in x and in score, with the median rule and a
    given H."""
    torch.manual_seed(n * d)
    x, score = (t.to(dtype) for t in particles(n, d))
    for h in (None, torch.tensor(0.5, dtype=torch.float64, device=DEVICE)):
        phi, finite = into(x, score, h, algorithm)
        assert finite
        # bit for bit in the interpreter (one fixed tile); on a GPU each kernel specialisation is autotuned
        # on its own, and another tile sums in another order
        exact = {"rtol": 0, "atol": 0} if not HAS_GPU else {}
        torch.testing.assert_close(phi, torch.ops.bmt_fast_triton.svgd_step(x, score, h, algorithm), **exact)
        for which in (0, 1):
            for (i, k), bad in zip([(0, 0), (n - 1, d - 1), (n // 2, d // 2)], [math.nan, math.inf, -math.inf]):
                xb, sb = x.clone(), score.clone()
                (xb, sb)[which][i, k] = bad
                phi, finite = into(xb, sb, h, algorithm)
                assert not finite and not bool(torch.isfinite(phi).all()), (which, i, k, bad, h)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_svgd_step_into_flags_values_that_overflow_float16(algorithm):
    """fp16 accumulates in fp32: a phi value finite in fp32 but past 65504 is stored as Inf, and flagged."""
    x = torch.zeros(2, 3, dtype=torch.float64)
    x[1, 0] = 1e-5  # 1e-5 apart at H = 2e-10: the repulsion pushes phi past fp16's range
    score = torch.full((2, 3), 6e4, dtype=torch.float64)
    h = torch.tensor(2e-10, dtype=torch.float64, device=DEVICE)
    wide, finite = into(*on_device(x.float(), score.float()), h, algorithm)
    assert finite and float(wide.abs().max()) > 65520
    narrow, finite = into(*on_device(x.half(), score.half()), h, algorithm)
    assert not finite and bool(torch.isinf(narrow).any())


def test_svgd_step_into_refuses_an_out_it_cannot_write():
    """The public API's out= checks (shape, dtype, contiguous, no memory shared with the inputs)."""
    x, score = particles(4, 3)
    for out, error, match in [
        (torch.empty(4, 2, dtype=torch.float64), ValueError, "out must have the shape of x"),
        (torch.empty(4, 3), TypeError, "out must have the dtype of x"),
        (torch.empty(3, 4, dtype=torch.float64).t(), ValueError, "out must be contiguous"),
    ]:
        with pytest.raises(error, match=match):
            torch.ops.bmt_fast_triton.svgd_step_into(x, score, out.to(DEVICE))
    with pytest.raises(ValueError, match="out must not share memory with x"):
        torch.ops.bmt_fast_triton.svgd_step_into(x, score, x)


def test_svgd_step_into_opcheck():
    x, score = (t.float() for t in particles(7, 5))
    for args in [(x, score, torch.empty_like(x)), (x, score, torch.empty_like(x), torch.tensor(2.0, device=DEVICE))]:
        torch.library.opcheck(torch.ops.bmt_fast_triton.svgd_step_into.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bandwidth", ["median", 1e-3])
def test_public_api_names_a_bad_input_from_the_kernels_flag(dtype, bandwidth, monkeypatch):
    """svgd_step(check_inputs=True) on the Gram path scans x and score only when the kernel's flag says phi
    is not finite (then to name the bad input), not before every step: a NaN/Inf at any place is still
    named, also where the particles are so far apart (or H so small) that every weight between two of
    them is exactly 0."""
    from bmt_fast import ops

    n, d = 6, 203
    x = torch.randn(n, d, dtype=torch.float64) * 50  # |x_i - x_j|^2 ~ 1e6: exp(-dist / H) == 0 at H = 1e-3
    x, score = on_device(x.to(dtype), torch.randn(n, d, dtype=torch.float64).to(dtype))
    assert bmt_fast.backends.get("triton").svgd_step_spreads_non_finite(x)
    scans = []
    real_check_finite = ops.check_finite
    monkeypatch.setattr(ops, "check_finite", lambda name, t: scans.append(name) or real_check_finite(name, t))
    phi = bmt_fast.svgd_step(x, score, bandwidth, backend="triton")
    assert scans == [] and bool(torch.isfinite(phi).all())
    for where in ("x", "score"):
        for (i, k), bad in zip([(0, 0), (n - 1, d - 1), (n // 2, 100)], [math.nan, math.inf, -math.inf]):
            xb, sb = x.clone(), score.clone()
            (xb if where == "x" else sb)[i, k] = bad
            with pytest.raises(ValueError, match=f"{where} contains 1 NaN/Inf"):
                bmt_fast.svgd_step(xb, sb, bandwidth, backend="triton")


@pytest.mark.parametrize("bandwidth,check_inputs", [("median", True), (2.0, False)])
def test_public_api_writes_out_with_an_event_shape(bandwidth, check_inputs):
    """out= on the Triton backend (n, *event): the Gram path writes phi into it, flagged or not."""
    x64, score64 = (t.reshape(6, 4, 5) for t in particles(6, 20))
    x, score = x64.float(), score64.float()
    out = torch.full_like(x, 7.0)
    assert bmt_fast.svgd_step(x, score, bandwidth, backend="triton", out=out, check_inputs=check_inputs) is out
    expected = bmt_fast.svgd_step(x64, score64, bandwidth, backend="torch")
    assert relative_error(out.double(), expected) < 1e-5


def svgd_module():
    import importlib

    kernels()  # imports bmt_fast.kernels
    return importlib.import_module("bmt_fast.kernels.svgd_step")


def test_flash_path_serves_the_tensor_core_modes_up_to_its_width():
    """IEEE products (fp32 default, fp64) keep the tiled kernel, as does d > FLASH_MAX_D."""
    module, utils = svgd_module(), kernels().utils
    assert module.FLASH_MAX_D == 128
    for mode in (utils.DOT_TF32, utils.DOT_HALF, utils.DOT_HALF_SPLIT):
        assert module.use_flash(1, mode) and module.use_flash(128, mode) and not module.use_flash(129, mode)
    assert not module.use_flash(16, utils.DOT_IEEE)


@pytest.fixture
def flash_launches(monkeypatch):
    """Counts the flash kernel's launches."""
    module = svgd_module()
    calls = []
    launch = module._FLASH.launch
    monkeypatch.setattr(module._FLASH, "launch", lambda *a, **k: calls.append(k["MODE"]) or launch(*a, **k))
    return calls


# (dtype, allow_tf32, bound on the relative error): the bounds of the tests above for each mode
FLASH_MODES = [
    (torch.float32, True, 2e-3),
    (torch.bfloat16, None, 3 * ulp(torch.bfloat16)),  # one bf16 product, as with True
    (torch.float16, None, ulp(torch.float16)),
    (torch.float16, True, ulp(torch.float16) + 2 * ulp(torch.bfloat16)),
]


@pytest.mark.parametrize("dtype,allow_tf32,bound", FLASH_MODES)
@pytest.mark.parametrize("n,d", [(1, 1), (70, 37), (130, 128), (200, 5)])
def test_flash_path_matches_reference(flash_launches, dtype, allow_tf32, bound, n, d):
    """One row; rows and columns not multiples of the tile (padding rows must give K = 0); d = FLASH_MAX_D;
    several column blocks. The median rule and a given bandwidth."""
    x, score = particles(n, d, dtype=dtype)
    for h in (None, torch.tensor(0.7 * d, dtype=torch.float64, device=DEVICE)):
        phi = svgd(x, score, h, algorithm="tiled", allow_tf32=allow_tf32)
        assert phi.dtype == dtype and phi.shape == (n, d)
        error = relative_error(phi, reference_phi(x, score, h))
        assert error <= bound, error
    assert len(flash_launches) == 2


def test_flash_path_can_be_switched_off_for_side_by_side_timing(flash_launches, monkeypatch):
    """FLASH_ENABLED = False (the benchmarks' bmt_fast-triton-tiled provider): the tiled kernel, same phi."""
    x, score = particles(130, 40, dtype=torch.bfloat16)
    flash = svgd(x, score, algorithm="tiled")
    monkeypatch.setattr(svgd_module(), "FLASH_ENABLED", False)
    tiled = svgd(x, score, algorithm="tiled")
    assert len(flash_launches) == 1
    expected, bound = reference_phi(x, score), 3 * ulp(torch.bfloat16)  # one bf16 product (bf16's default)
    assert relative_error(flash, expected) <= bound and relative_error(tiled, expected) <= bound


@pytest.mark.parametrize("dtype,allow_tf32,bound", FLASH_MODES[:2])
@pytest.mark.parametrize("splits", [2, 3])
def test_flash_column_splits_are_summed_exactly_once(flash_launches, dtype, allow_tf32, bound, splits):
    x, score = particles(200, 70, offset=1e3, dtype=dtype)
    phi = svgd(x, score, algorithm="tiled", allow_tf32=allow_tf32, splits=splits)
    assert relative_error(phi, reference_phi(x, score)) <= bound
    assert len(flash_launches) == 1


@pytest.mark.parametrize("dtype,allow_tf32,bound", [(torch.float32, None, 1e-6), *FLASH_MODES])
@pytest.mark.parametrize("algorithm,n,d", [("gram", 13, 40), ("tiled", 70, 37), ("tiled", 130, 300)])
def test_tiny_bandwidth(dtype, allow_tf32, bound, algorithm, n, d):
    """A fixed H far below the squared distances (phi about score / n): a particle's own term k_ii = 1 is
    score_i, added exactly; folded into W it was (score_i - (2/H) xc_i) + (2/H) xc_i, two large terms that
    cancel (fp32 error up to 0.6 at H = 1e-6 in the CPU kernels, which folded it the same way). The Gram,
    tiled and (d <= 128, tensor-core modes) flash kernels."""
    x, score = particles(n, d, dtype=dtype)
    x = (x.double() * 7).to(dtype)
    h = torch.tensor(1e-6, dtype=torch.float64, device=DEVICE)
    phi = svgd(x, score, h, algorithm=algorithm, allow_tf32=allow_tf32)
    assert relative_error(phi, reference_phi(x, score, h)) <= bound


def tight_clusters_far_apart(n, d, *, seed=0):
    """bf16 particles in two clusters 0.05 wide whose centres are drawn N(0, 10^2) per feature, H the median
    of the squared distances within a cluster (the kernel's width far below the particles' spread)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, d, generator=generator, dtype=torch.float64) * 10
    x = centres[torch.arange(n) % 2] + 0.05 * torch.randn(n, d, generator=generator, dtype=torch.float64)
    score = torch.randn(n, d, generator=generator, dtype=torch.float64)
    same = x[0::2].bfloat16().double()
    h = torch.tensor(float(torch.cdist(same, same).square().median()), dtype=torch.float64, device=DEVICE)
    x, score = on_device(x.bfloat16(), score.bfloat16())
    return x, score, h


@pytest.mark.parametrize(
    "algorithm,n,d,splits,split",
    [("tiled", 256, 64, None, True), ("tiled", 200, 70, 3, True), ("tiled", 130, 129, None, True),
     ("tiled", 130, 300, 2, True), ("gram", 16, 1024, None, True), ("gram", 16, 4096, None, False),
     ("gram", 64, 2048, None, False)],
)  # fmt: skip
def test_bf16_step_of_tight_clusters_far_apart(algorithm, n, d, splits, split):
    """bf16's one product on particles far apart next to the kernel's width: the distances multiply the
    particles shifted exactly (centring's SHIFT row: x - shift a bf16 value, where the mean rounded to bf16
    had rounded x - mean again: K 4.5e-2 off), and where some |x - centre| > 8 sqrt(H) the step multiplies K
    by score and K' = -(2/H) K by those exact shifted particles into one accumulator (splits_w), where the
    bf16 rounding of W = score - (2/H) xc had put phi 0.25 off (interpreter, 256 x 64). Within 2 bf16 ulps
    now, as on Gaussian clouds: the flash kernel (d <= 128; with column splits, whose combine pass finishes
    the split form too), the tiled kernel (d > 128), the Gram path's apply. With thousands of features the
    kernel's width grows with the distances (H ~ d) and the folded W is as accurate (and taken)."""
    x, score, h = tight_clusters_far_apart(n, d)
    centred = kernels().centring.centring(x)
    shifted = x.float() - centred[0]
    assert torch.equal(shifted.bfloat16().float(), shifted)  # exact in bf16
    assert (float(centred[2].max()) > 8 * math.sqrt(float(h))) == split
    phi = svgd(x, score, h, algorithm=algorithm, splits=splits)
    assert relative_error(phi, reference_phi(x, score, h)) <= 2 * ulp(torch.bfloat16)
    # the median rule takes the same path (its H from all pairs: the clusters' distance)
    phi = svgd(x, score, algorithm=algorithm)
    assert relative_error(phi, reference_phi(x, score)) <= 2 * ulp(torch.bfloat16)


@pytest.mark.parametrize("case", ["outlier", "range"])
def test_bf16_particles_without_a_well_conditioned_exact_shift(case):
    """Columns with no exact bf16 shift that keeps the expansion well conditioned take the centre, as before
    the exact shifts (helpers.far_from_zero_bf16_particles): a shift of 0 there had left K 0.1 off (outlier)
    and K, the median and phi NaN (range); now within bf16's rounding (the flash and tiled kernels)."""
    x = far_from_zero_bf16_particles()[case]
    score = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    x, score = on_device(x, score)
    h = reference.median_bandwidth(x.double())
    k = kernels().rbf_kernel_forward(x, x, h)
    assert relative_error(k, reference.rbf_kernel(x.double(), x.double(), h)) <= 2 * ulp(torch.bfloat16)
    median = kernels().median_bandwidth_forward(x, algorithm="tiled")
    assert abs(float(median) / float(h) - 1) <= 2e-3
    for d in (64, 32):  # (the flash kernel; 32 features: more of them per program)
        phi = svgd(x[:, :d].contiguous(), score[:, :d].contiguous(), algorithm="tiled")
        assert relative_error(phi, reference_phi(x[:, :d], score[:, :d])) <= 2 * ulp(torch.bfloat16)


def test_bf16_kernel_and_median_of_tight_clusters_far_apart():
    """K and its median from the exactly shifted bf16 particles (tiled kernels): K within bf16's rounding
    of its entries (it had been 4.7e-2 off with the mean's shift), the median as the reference's."""
    x, _, h = tight_clusters_far_apart(300, 128)
    k = kernels().rbf_kernel_forward(x, x, h)
    assert relative_error(k, reference.rbf_kernel(x.double(), x.double(), h)) <= ulp(torch.bfloat16)
    median = kernels().median_bandwidth_forward(x, algorithm="tiled")
    assert abs(float(median) / float(reference.median_bandwidth(x.double())) - 1) <= 1e-5


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_tf32_only_when_asked_and_within_its_documented_error(algorithm):
    """allow_tf32=True rounds fp32 operands to TF32 (10 mantissa bits): relative error ~3e-4 measured
    (benchmarks/results/triton_precision_interpreter.csv), bound 2e-3 here; never the default."""
    x, score = particles(70, 37)
    x, score = x.float(), score.float()
    expected = reference_phi(x, score)
    exact = relative_error(svgd(x, score, algorithm=algorithm), expected)
    tf32 = relative_error(svgd(x, score, algorithm=algorithm, allow_tf32=True), expected)
    assert exact < 2e-6
    assert exact < tf32 < 2e-3


@pytest.mark.parametrize("d", [64, 200])  # the flash path, and the tiled kernel beyond FLASH_MAX_D
def test_fp16_copies_are_at_distance_zero_in_split_products(d):
    """fp16's default mode multiplies hi + lo bf16 parts (four products since 2026-12-07): the norms are
    now those products' too, so two copies of a particle are at distance ~0. Taken of the exact operand,
    copies had been at 2 |lo|^2: K 0.93 between two copies at H = 1, phi 7e-2 off (the tiled step, the
    tiled kernel and the median's tiles: more than 256 particles take them by default). Exact zeros they are
    not: the median rule of mostly copies gives the fp32 rounding of the expansion, not the reference's
    floor (as the README's "noise" case says)."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(2, d, generator=generator, dtype=torch.float64) * 10
    x = centres[torch.arange(130) % 2].half()
    score = torch.randn(130, d, generator=generator, dtype=torch.float64).half()
    x, score = on_device(x, score)
    h = torch.tensor(1.0, dtype=torch.float64, device=DEVICE)
    k = kernels().rbf_kernel_forward(x, x, h, self_kernel=True, algorithm="tiled")
    assert float(k[0, 2]) >= 1 - 2 * ulp(torch.float16) and float(k[1, 3]) >= 1 - 2 * ulp(torch.float16)
    phi = svgd(x, score, h, algorithm="tiled")
    assert relative_error(phi, reference_phi(x, score, h)) <= 8 * ulp(torch.float16)
    mostly_copies = centres[(torch.arange(130) % 4 == 0).long()].half().to(DEVICE)  # (over half the pairs: 0)
    h_rule = kernels().median_bandwidth_forward(mostly_copies, algorithm="tiled")
    assert float(reference.median_bandwidth(mostly_copies.double())) == reference.BANDWIDTH_FLOOR
    # the copies' distances are the fp32 rounding of the expansion |a|^2 + |b|^2 - 2 a.b (the norms and the
    # products sum in different orders; the interpreter rounds to bf16 as a GPU does), 2 |lo|^2 (~0.4) before
    shift = kernels().centring.centring_shift(mostly_copies)
    expansion = float((mostly_copies.float() - shift).square().sum(1).max())
    assert float(h_rule) * math.log(130) <= 16 * 2.0**-24 * expansion


def test_identical_particles_give_the_mean_score():
    x = (torch.full((6, 5), 0.1) + torch.arange(5.0)).to(DEVICE)
    score = torch.randn(6, 5, device=DEVICE)
    assert math.isclose(float(bmt_fast.median_bandwidth(x, backend="triton")), bmt_fast.BANDWIDTH_FLOOR, rel_tol=1e-6)
    for algorithm in ALGORITHMS:
        phi = svgd(x, score, algorithm=algorithm)
        torch.testing.assert_close(phi, score.mean(0, keepdim=True).expand_as(score))


def test_single_particle_gives_its_score():
    x, score = particles(1, 10)
    for algorithm in ALGORITHMS:
        torch.testing.assert_close(svgd(x, score, algorithm=algorithm), score)


def test_public_api_with_event_shape_and_strides():
    """backend="triton" through bmt_fast.svgd_step: (n, *event) inputs, non-contiguous, float bandwidth."""
    base = torch.randn(9, 4, 6, dtype=torch.float64, device=DEVICE)
    x = base.transpose(1, 2)  # (9, 6, 4), strided
    score = torch.randn(9, 6, 4, dtype=torch.float64, device=DEVICE)
    for bandwidth in ("median", 2.5):
        phi = bmt_fast.svgd_step(x, score, bandwidth, backend="triton")
        assert phi.shape == x.shape
        h = None if bandwidth == "median" else bandwidth
        expected = reference_phi(x.reshape(9, -1), score.reshape(9, -1), h).reshape(x.shape)
        assert relative_error(phi, expected) < 1e-12


def test_trajectory_follows_the_torch_backend():
    """Thirty SVGD steps towards a Gaussian (median bandwidth each step) stay on the reference trajectory."""
    mu, sigma = torch.tensor([2.0, -1.0], dtype=torch.float64, device=DEVICE), 0.5
    x = torch.randn(64, 2, dtype=torch.float64, device=DEVICE) * 0.1 + 5.0
    x_ref = x.clone()
    for _ in range(30):
        x = x + 0.1 * bmt_fast.svgd_step(x, -(x - mu) / sigma**2, backend="triton")
        x_ref = x_ref + 0.1 * bmt_fast.svgd_step(x_ref, -(x_ref - mu) / sigma**2, backend="torch")
    assert (x.mean(0) - 5.0).abs().max() > 1.0  # the particles moved
    assert relative_error(x, x_ref) < 1e-10


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(4, 3), torch.randn(4, 2), None), ValueError, "score must have the shape of x"),
        (lambda: (torch.randn(4, 3), torch.randn(4, 3).double(), None), TypeError, "score must have the dtype"),
        (lambda: (torch.randn(4), torch.randn(4), None), ValueError, "x must be a non-empty 2-D"),
        (lambda: (torch.ones(4, 3, dtype=torch.int32), torch.ones(4, 3, dtype=torch.int32), None), TypeError, "x must be float"),
        (lambda: (torch.randn(4, 3), torch.randn(4, 3), torch.tensor([1.0, 2.0])), ValueError, "bandwidth must be"),
    ],
)
def test_bad_inputs_name_the_argument(make, error, match):
    x, score, h = (None if t is None else t.to(DEVICE) for t in make())
    with pytest.raises(error, match=match):
        torch.ops.bmt_fast_triton.svgd_step(x, score, h)


def test_bad_algorithm():
    x, score = particles(5, 3)
    with pytest.raises(ValueError, match="algorithm must be"):
        torch.ops.bmt_fast_triton.svgd_step(x, score, None, "fast")


def test_a_bandwidth_too_small_for_the_folded_sums_is_named_beyond_the_gram_path():
    """More than 256 particles take the tiled kernels, which note no finiteness of phi: a given H so small that
    (2/H)(x - c) overflows the folded sums had returned an all-NaN phi with no error there (the CPU's kernels
    and Triton's Gram path name it). The scan of phi runs only where the shape allows the overflow at all."""
    x, score = particles(300, 2, dtype=torch.float32)
    x = x * 10
    with pytest.raises(ValueError, match="bandwidth 2e-38 is too small for these torch.float32 particles"):
        bmt_fast.svgd_step(x, score, 2e-38, backend="triton")
    assert torch.isnan(bmt_fast.svgd_step(x, score, 2e-38, backend="triton", check_inputs=False)).all()


def test_the_fold_scans_bandwidth_is_read_before_the_step_is_launched(monkeypatch):
    """The fold-overflow scan's H is read right after the input scans (which synchronise a GPU anyway), not
    after the step's launch: reading a device H there had made every checked call with a given H wait for
    its step on the GPU."""
    from bmt_fast import ops

    x, score = particles(300, 2, dtype=torch.float32)
    events = []
    may_overflow = ops.fold_may_overflow
    monkeypatch.setattr(ops, "fold_may_overflow", lambda *a: events.append("read H") or may_overflow(*a))
    triton_backend = bmt_fast.backends.get("triton")
    step = type(triton_backend).svgd_step
    monkeypatch.setattr(type(triton_backend), "svgd_step", lambda self, *a, **k: events.append("step") or step(self, *a, **k))
    phi = bmt_fast.svgd_step(x, score, torch.tensor(3.0, device=DEVICE), backend="triton")
    assert events == ["read H", "step"] and torch.isfinite(phi).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bad_bandwidth_without_host_checks_gives_nan(dtype):
    """check_inputs=False skips the host-side check; a bandwidth that is not positive and finite then gives
    NaN (no host sync, and no device-side assert, which would end the CUDA context), and every positive
    finite one is taken: the least subnormal and the largest."""
    x, score = (t.to(dtype) for t in particles(5, 3))
    for bad in (-1.0, 0.0, -0.0, math.nan, math.inf, -math.inf):
        h = torch.tensor(bad, dtype=dtype, device=DEVICE)
        for algorithm in ALGORITHMS:
            phi = torch.ops.bmt_fast_triton.svgd_step(x, score, h, algorithm)
            assert bool(torch.isnan(phi).all()), (bad, algorithm)
        assert bool(torch.isnan(torch.ops.bmt_fast_triton.rbf_kernel(x, x, h, True, None)).all()), bad
        for algorithm in ("gram", "tiled"):  # the kernels read H through tiles.load_bandwidth
            k = kernels().rbf_kernel_forward(x, score, h, algorithm=algorithm)
            assert bool(torch.isnan(k).all()), (bad, algorithm)
        k = kernels().rbf_kernel_forward(x, score, torch.tensor(3.0, dtype=dtype, device=DEVICE))  # finite K
        grads = kernels().rbf_kernel_backward(torch.ones_like(k), x, score, k, h)  # H read in the kernel
        assert all(bool(torch.isnan(g).all()) for g in grads), bad
        with pytest.raises(ValueError, match="bandwidth must be positive"):  # the public API's own check
            bmt_fast.svgd_step(x, score, h, backend="triton")
    info = torch.finfo(dtype)
    utils = kernels().utils
    for good in (info.smallest_normal * info.eps, 1.0, info.max):  # kept as they are
        h = torch.tensor(good, dtype=dtype, device=DEVICE)
        assert utils.check_bandwidth(h, x).data_ptr() == h.data_ptr()  # a view: no launch of its own
        assert float(utils.valid_bandwidth(h, x)) == good
    if dtype == torch.float32:  # a float64 H (the median rule's) is rounded to fp32 where it is read
        h = torch.tensor(1e-60, dtype=torch.float64, device=DEVICE)  # 0 in fp32: no fp32 K or 2/H from it
        assert bool(torch.isnan(torch.ops.bmt_fast_triton.svgd_step(x, score, h, "tiled")).all())
        assert math.isnan(float(utils.valid_bandwidth(h, x)))
        # past fp32's range (a cast's +inf had been taken for an invalid H: all NaN) as fp32's largest value,
        # whose K is the reference's 1 to fp32's precision
        h = torch.tensor(1e300, dtype=torch.float64, device=DEVICE)
        assert float(utils.valid_bandwidth(h, x)) == info.max
        for algorithm in ALGORITHMS:
            phi = torch.ops.bmt_fast_triton.svgd_step(x, score, h, algorithm)
            assert relative_error(phi, reference_phi(x, score, 1e300)) < 1e-6, algorithm
        assert bool((torch.ops.bmt_fast_triton.rbf_kernel(x, x, h, True, None) == 1).all())
    for good in (1.0, info.max):  # (the least subnormal overflows 2 / H)
        phi = bmt_fast.svgd_step(x, score, torch.tensor(good, dtype=dtype), backend="triton", check_inputs=False)
        assert phi.shape == x.shape and not bool(torch.isnan(phi).any()), good


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_svgd_step_into_with_a_bandwidth_that_is_a_view_of_out(algorithm):
    """H given as a view of out: the kernels read it while other programs write phi over it (phi had been 0.56
    off); it is read from a copy now, as the CPU reads it before writing."""
    n, d = 4, 1100
    x, score = particles(n, d)
    out = torch.zeros(n, d, dtype=torch.float64, device=DEVICE)
    out[0, 0] = 2.0 * d  # near the squared distances: another H gives another phi
    expected = reference_phi(x, score, 2.0 * d)
    assert bool(torch.ops.bmt_fast_triton.svgd_step_into(x, score, out, out[0, 0], algorithm))
    assert relative_error(out, expected) < 1e-12


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype,allow_tf32", [(torch.float32, None), (torch.float32, True), (torch.bfloat16, None)])
def test_nan_particle_with_given_bandwidth_gives_nan(algorithm, dtype, allow_tf32):
    """A particle holding a NaN (checks off) with a given H: phi all NaN and K's entries of its pairs NaN, as the
    reference's, on the Gram path, the tiled kernel (IEEE fp32) and the flash kernel (TF32, bf16). The clamps
    of the distances (and the flash kernel's exponent) at 0 dropped the NaN on a GPU (its max and min return
    the number beside a NaN), K's entries became 1 and phi was NaN in one column only."""
    n, d = 70, 24
    x, score = (t.to(dtype) for t in particles(n, d))
    x[n // 2, 5] = math.nan
    h = torch.tensor(8.0, device=DEVICE)
    phi = torch.ops.bmt_fast_triton.svgd_step(x, score, h, algorithm, allow_tf32)
    assert bool(torch.isnan(phi).all()), (torch.isnan(phi).sum(), phi.numel())
    k = torch.ops.bmt_fast_triton.rbf_kernel(x, x, h, True, allow_tf32)
    off = torch.arange(n, device=DEVICE) != n // 2
    assert bool(torch.isnan(k[n // 2, off]).all() and torch.isnan(k[off, n // 2]).all())
    y = x[:9].nan_to_num()
    assert bool(torch.isnan(torch.ops.bmt_fast_triton.rbf_kernel(x, y, h, False, allow_tf32)[n // 2]).all())
    assert bool(torch.isnan(torch.ops.bmt_fast_triton.rbf_kernel(y, x, h, False, allow_tf32)[:, n // 2]).all())


def test_opcheck():
    x, score = (t.float() for t in particles(7, 5))
    for args in [(x, score, None), (x, score, torch.tensor(2.0, device=DEVICE), "gram"), (x, score, None, "tiled", True)]:
        torch.library.opcheck(torch.ops.bmt_fast_triton.svgd_step.default, args)


def test_torch_compile_without_graph_breaks():
    def step(x, score):
        return x + 0.1 * bmt_fast.svgd_step(x, score, backend="triton", check_inputs=False)

    x, score = particles(20, 6)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, score), x + 0.1 * reference_phi(x, score))


FIRST_USE_COMPILED = """
import os, sys, torch, bmt_fast
from bmt_fast.triton_backend import TRITON
assert TRITON._reason is None  # nothing has touched the Triton backend in this process yet
device = torch.device(sys.argv[1])
x, score = torch.randn(12, 5, device=device), torch.randn(12, 5, device=device)
step = torch.compile(lambda a, s: bmt_fast.svgd_step(a, s, 2.0, backend="triton", check_inputs=False),
                     backend="aot_eager", fullgraph=True)
kernel = torch.compile(lambda a: bmt_fast.rbf_kernel(a, None, 2.0, backend="triton", check_inputs=False),
                       backend="aot_eager", fullgraph=True)
torch.testing.assert_close(step(x, score), bmt_fast.svgd_step(x, score, 2.0, backend="torch"))
torch.testing.assert_close(kernel(x), bmt_fast.rbf_kernel(x, None, 2.0, backend="torch"))
print("ok")
"""


@requires_triton
def test_torch_compile_of_the_first_triton_call_in_a_process(tmp_path):
    """A fullgraph torch.compile whose trace is the process's first use of the Triton backend: the kernels'
    import runs as it is (dynamo does not trace importlib: Unsupported, until 2026-12-06, unless something had
    used the backend eagerly first)."""
    import subprocess
    import sys

    from helpers import subprocess_env

    script = tmp_path / "first_use.py"
    script.write_text(FIRST_USE_COMPILED)
    env = subprocess_env(**({} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}))
    run = subprocess.run([sys.executable, str(script), DEVICE.type], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_auto_rule_on_cuda_follows_the_h200_timings():
    rule = bmt_fast.backends._AUTO_RULES["cuda"]
    assert rule("svgd_step", 1000, 64, torch.float32)[:2] == ["cuda", "triton"]
    assert rule("svgd_step", 16, 409_600, torch.float32)[:2] == ["cuda", "triton"]
    assert rule("svgd_step", 1024, 128, torch.bfloat16)[:2] == ["cuda", "triton"]
    # the measured exceptions: many fp32 particles in few dimensions, many bf16 ones up to the flash width
    assert rule("svgd_step", 65536, 64, torch.float32)[:2] == ["triton", "cuda"]
    assert rule("svgd_step", 65536, 128, torch.float32)[:2] == ["cuda", "triton"]
    assert rule("svgd_step", 65536, 128, torch.bfloat16)[:2] == ["triton", "cuda"]
    assert rule("svgd_step", 65536, 129, torch.bfloat16)[:2] == ["cuda", "triton"]
    assert rule("svgd_step", 65536, 64, torch.float16)[:2] == ["cuda", "triton"]  # fp16: not measured
    # past the Triton kernels' 32-bit offsets (2^31 elements a tensor): never Triton
    assert rule("svgd_step", 2**25, 64, torch.float32) == ["cuda", "torch"]
    assert rule("rbf_kernel", 46_341, 8, torch.float32) == ["cuda", "torch"]  # K: 46,341^2 > 2^31 - 1
    assert rule("rbf_kernel", 46_340, 8, torch.float32)[:2] == ["triton", "cuda"]


def test_sizes_past_the_kernels_offsets_and_grid_are_refused_by_name():
    """32-bit offsets wrap at 2^31 elements (a store before the buffer on a GPU) and grid axes 1 and 2 end
    at 65,535 programs (a failed launch): refused with an error that names the limit, before any launch."""
    utils = kernels().utils
    with pytest.raises(ValueError, match="x has 2,147,483,648 elements: the Triton kernels index with 32-bit"):
        utils.check_elements("x", 2**31)
    utils.check_elements("x", 2**31 - 1)
    with pytest.raises(ValueError, match="65,536 programs on a grid axis of at most 65,535"):
        utils.check_grid_axis("phi's column chunks", 65_536)
    import importlib

    median = importlib.import_module("bmt_fast.kernels.median")
    with pytest.raises(ValueError, match='algorithm="gram" takes at most 256 particles'):
        median.use_gram(257, "gram")
    x = torch.zeros(1, 1, device=DEVICE).expand(3, 2**30)  # 3 x 2^30 elements, one in memory
    with pytest.raises(ValueError, match="32-bit offsets"):
        utils.check_rows("x", x)  # what every op checks first (the ops would make x contiguous: 12 GB)


@pytest.mark.parametrize("n,d", [(1, 70), (13, 130), (16, 129), (20, 300), (37, 65)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gram_path_with_each_candidate_tile(n, d, dtype):
    """The Gram path's small autotuning candidates (16 and 32 rows: a prompt's particles without padding
    rows) forced in turn, for both of its kernels: rows and columns past the tile's edge, several row blocks
    (n = 20, 37), the median rule and a given H, against float64."""
    import importlib

    kernels()
    gram = importlib.import_module("bmt_fast.kernels.gram")
    module = importlib.import_module("bmt_fast.kernels.svgd_step")
    small = [t for t in module.GRAM_APPLY_TILES if t.block_m < 64]
    assert {t.block_m for t in small} == {16, 32}
    assert {t.block_m for t in small} <= {t.block_m for t in gram._GRAM_TILES}  # the Gram kernel tries them too
    x, score = particles(n, d, dtype=dtype)
    bound = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    for h in (None, torch.tensor(0.7 * d, dtype=torch.float64, device=DEVICE)):
        expected = reference_phi(x, score, h)
        for tile in small:
            phi = svgd(x, score, h, algorithm="gram", tile=tile)
            assert phi.dtype == dtype and relative_error(phi, expected) < bound, (tile, h)


@pytest.mark.parametrize("outlier_row", [0, 7])
def test_gram_path_centres_by_the_mean_whatever_the_row_order(outlier_row):
    """8 particles of 64 features, 7 within 1e-2 of each other and one 100 away. Up to 16 particles the
    Gram kernel had shifted the rows by x[0] (saving the centring pass): with the outlier there, fp32
    cancellation made H 31 % and phi 210 % wrong. Now in either row as close as torch's fp32 is (in either
    row order: which of the two fp32 Gram sums cancels less depends on the order and on the machine's GEMM,
    both the kernel's and torch's, 4e-4 to 3e-3 for H here)."""
    torch.manual_seed(11)
    n, d = 8, 64
    x64 = torch.randn(1, d, dtype=torch.float64) + 1e-2 * torch.randn(n, d, dtype=torch.float64)
    x64[0] += 100 * torch.randn(d, dtype=torch.float64) / d**0.5
    s64 = torch.randn(n, d, dtype=torch.float64)
    orders = {0: torch.arange(n), 7: torch.roll(torch.arange(n), -1)}
    expected_h = reference.median_bandwidth(x64)
    torch_h = max(relative_error(reference.median_bandwidth(x64[o].float()), expected_h) for o in orders.values())
    torch_phi = max(
        relative_error(reference.svgd_step(x64[o].float(), s64.float(), None), reference.svgd_step(x64[o], s64, None))
        for o in orders.values()
    )
    x64 = x64[orders[outlier_row]]
    x, score = x64.float().to(DEVICE), s64.float().to(DEVICE)
    h = kernels().median_bandwidth_forward(x, algorithm="gram")
    assert relative_error(h.cpu(), expected_h) <= max(2 * torch_h, 1e-5)
    expected = reference.svgd_step(x64, s64, None)
    phi = svgd(x, score, None, algorithm="gram")
    assert relative_error(phi.cpu(), expected) <= max(2 * torch_phi, 1e-5)


def test_autotuning_keys_include_every_specialisation():
    """A tile tuned for one specialisation must not be reused for another (the fp64 Gram path ran out of
    shared memory on an H200 with a tile tuned for the tiled path of the same n, d)."""
    import importlib

    kernels()  # imports bmt_fast.kernels
    utils = importlib.import_module("bmt_fast.kernels.utils")
    module = importlib.import_module("bmt_fast.kernels.svgd_step")
    keys = utils.specialisation_keys(module._SVGD.raw)
    assert {"DIST_GIVEN", "FINALIZE", "BLOCK_V", "ACC", "MODE"} <= set(keys)
    assert "BLOCK_M" not in keys and "BLOCK_N" not in keys
    assert {"FINALIZE", "D_PAD", "ACC", "MODE"} <= set(utils.specialisation_keys(module._FLASH.raw))
    assert module.FLASH_TILES[0] == utils.FIXED_TILE  # the tile the interpreter runs and CI compiles for sm_90


@requires_gpu
def test_gpu_auto_picks_a_kernel():
    x = torch.randn(8, 3, device="cuda")
    assert bmt_fast.backends.select("auto", "svgd_step", x).name in ("cuda", "triton")


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_many_particles_without_quadratic_memory(dtype):
    """n = 65536, d = 64: the n x n fp32 matrix would be 16 GiB; checked on 256 rows against fp64."""
    n, d = 65536, 64
    x, score = (t.to(dtype) for t in particles(n, d, dtype=torch.float32))
    h = torch.tensor(float(d), device="cuda")
    # The first call autotunes, and Triton's benchmarking holds a 256 MB buffer to flush the L2 cache
    # meanwhile; the steady state is measured.
    bmt_fast.svgd_step(x, score, h, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    phi = bmt_fast.svgd_step(x, score, h, backend="triton")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 256 * 2**20
    rows = torch.arange(0, n, n // 256, device="cuda")
    x64, s64 = x.double(), score.double()
    xc = x64 - x64.mean(0)
    k = torch.exp(-torch.cdist(xc[rows], xc).square() / float(h))
    expected = (k @ s64 + (2 / float(h)) * (xc[rows] * k.sum(1, keepdim=True) - k @ xc)) / n
    bound = 2e-5 if dtype == torch.float32 else 2 * ulp(dtype)
    assert relative_error(phi[rows], expected) < bound


@requires_gpu
def test_gpu_few_particles_huge_d():
    x, score = particles(16, 1_000_000, dtype=torch.float32)
    phi = bmt_fast.svgd_step(x, score, backend="triton")
    assert relative_error(phi, reference_phi(x, score)) < 2e-5


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fp16_default_on_tight_clusters_far_apart(algorithm):
    """fp16's default products (hi + lo bf16 parts) on two clusters 0.05 wide whose centres are 10 apart, H from
    the distances within a cluster: the dropped lo lo' term had put 2^-16 |x - c|^2 on every distance, phi
    0.25 - 0.46 and K up to 0.47 off (exact fp32 products: 4e-3); now within twice the exact products' error."""
    torch.manual_seed(4)
    n, d = (70, 8) if algorithm == "tiled" else (16, 64)
    centres = 10 * torch.randn(2, d, dtype=torch.float64)
    x = (centres[torch.arange(n) % 2] + 0.05 * torch.randn(n, d, dtype=torch.float64)).half()
    score = torch.randn(n, d, dtype=torch.float64).half()
    within = reference.pairwise_sq_dists(x.double())[::2, ::2]
    h = within.median() / math.log(n / 2 + 1.0)
    x, score = on_device(x, score)
    expected, kernel = reference_phi(x, score, h), reference.rbf_kernel(x.double(), None, h.to(x.device))
    ops = torch.ops.bmt_fast_triton
    exact = relative_error(ops.svgd_step(x, score, h.to(x.device), algorithm, False), expected)
    assert relative_error(ops.svgd_step(x, score, h.to(x.device), algorithm, None), expected) <= 2 * exact + 1e-3
    exact = relative_error(ops.rbf_kernel(x, x, h.to(x.device), True, False), kernel)
    assert relative_error(ops.rbf_kernel(x, x, h.to(x.device), True, None), kernel) <= 2 * exact + 1e-3
