"""Bad input gives a clear error naming the argument, never a silent wrong answer."""

import math

import pytest
import torch
from helpers import float32_matmul_precision, requires_amx, requires_cpu_extension, run_cpu_variants

import bmt_fast
from bmt_fast import reference
from bmt_fast._validation import check_finite


def good(n=4, d=3, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(4, 3), torch.randn(4, 2)), ValueError, "score must have the shape of x"),
        (lambda: (torch.randn(4, 3), torch.randn(5, 3)), ValueError, "score must have the shape of x"),
        (lambda: (torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64)), TypeError, "score must have the dtype"),
        (lambda: (torch.randn(4, 3, device="meta"), torch.randn(4, 3)), ValueError, "score must be on the device"),
        (lambda: (torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.int64)), TypeError, "x must be float"),
        (lambda: (torch.randn(0, 3), torch.randn(0, 3)), ValueError, "x must have at least 1 particle"),
        (lambda: (torch.randn(4, 0), torch.randn(4, 0)), ValueError, "x is empty"),
        (lambda: (torch.tensor(1.0), torch.tensor(1.0)), ValueError, "0-dim"),
        (lambda: ([[1.0]], torch.randn(1, 1)), TypeError, "x must be a torch.Tensor"),
        (lambda: (torch.randn(4, 3).to_sparse(), torch.randn(4, 3)), TypeError, "x must be a dense .strided. tensor"),
        (lambda: (torch.randn(4, 3), torch.randn(4, 3).to_sparse_csr()), TypeError, "score must be a dense"),
    ],
)
def test_bad_particles(cpu_backend, make, error, match):
    x, score = make()
    with pytest.raises(error, match=match):
        bmt_fast.svgd_step(x, score, backend=cpu_backend)


@pytest.mark.parametrize("where", ["x", "score"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_rejected(cpu_backend, where, bad):
    x, score = good()
    (x if where == "x" else score)[1, 2] = bad
    with pytest.raises(ValueError, match=f"{where} contains 1 NaN/Inf"):
        bmt_fast.svgd_step(x, score, backend=cpu_backend)


@requires_cpu_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 4, 13, 64])
@pytest.mark.parametrize("bandwidth", ["median", 1e-3])
def test_cpu_gram_path_names_every_bad_input_from_its_output(n, dtype, bandwidth):
    """The CPU Gram path checks phi as its kernel writes it, not x and score: a NaN/Inf at any place must
    still be reported, also where the particles are so far apart (or H so small) that every weight between
    two particles is exactly 0, and at the first particle (the shift) and the last column (a ragged vector)."""
    from bmt_fast import backends

    d = 203
    x = torch.randn(n, d, dtype=torch.float64) * 50  # |x_i - x_j|^2 ~ 1e6: exp(-dist / H) == 0 at H = 1e-3
    score = torch.randn(n, d, dtype=torch.float64)
    x, score = x.to(dtype), score.to(dtype)
    assert backends.get("cpu").svgd_step_spreads_non_finite(x)
    assert_flagged_path_names_bad_inputs(x, score, bandwidth)


@pytest.fixture
def input_scans(monkeypatch):
    """The names of the inputs that the public svgd_step scans for NaN/Inf, in call order."""
    from bmt_fast import ops

    scans = []

    def counting(name, t):
        scans.append(name)
        return check_finite(name, t)

    monkeypatch.setattr(ops, "check_finite", counting)
    return scans


def assert_flagged_path_names_bad_inputs(x, score, bandwidth):
    n, d = x.shape
    phi = bmt_fast.svgd_step(x, score, bandwidth, backend="cpu")
    assert bool(torch.isfinite(phi).all())
    for where in ("x", "score"):
        for i, k in {(0, 0), (n - 1, d - 1), (n // 2, d // 2)}:
            for bad in (math.nan, math.inf, -math.inf):
                xb, sb = x.clone(), score.clone()
                (xb if where == "x" else sb)[i, k] = bad
                given = xb.clone(), sb.clone()
                with pytest.raises(ValueError, match=f"{where} contains 1 NaN/Inf"):
                    bmt_fast.svgd_step(xb, sb, bandwidth, backend="cpu")
                for t, t0 in zip((xb, sb), given):  # the inputs are left as they were
                    torch.testing.assert_close(t, t0, rtol=0, atol=0, equal_nan=True)


@requires_amx
@pytest.mark.parametrize("n, d", [(65, 32), (300, 203), (70, 2100)])
@pytest.mark.parametrize("bandwidth", ["median", 1e-3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_amx_path_names_every_bad_input_from_its_output(input_scans, n, d, bandwidth, dtype):
    """bf16 particles on the AMX path (n > 64, d >= 32), and fp32 ones under
    torch.set_float32_matmul_precision("medium"), are checked like the Gram path's: the last pass flags a
    non-finite phi, the inputs are scanned only then (not at all when phi is finite), and a NaN/Inf
    anywhere, also where every weight between two particles is exactly 0 (0 * NaN must stay NaN in K W),
    is reported by name. Below 32 features (the fp32 path) likewise."""
    from bmt_fast import backends

    scans = input_scans
    x = (torch.randn(n, d, dtype=torch.float64) * 50).to(dtype)
    score = torch.randn(n, d, dtype=torch.float64).to(dtype)
    cpu = backends.get("cpu")
    with float32_matmul_precision("medium" if dtype == torch.float32 else "highest"):
        assert cpu.svgd_step_spreads_non_finite(x)
        bmt_fast.svgd_step(x, score, bandwidth, backend="cpu")
        bmt_fast.svgd_step(x, score, bandwidth, backend="cpu", out=torch.empty_like(x))
        assert scans == []
        assert_flagged_path_names_bad_inputs(x, score, bandwidth)
        scans.clear()  # (naming the bad inputs above scanned them)
        assert cpu.svgd_step_spreads_non_finite(x[:, :31])
        bmt_fast.svgd_step(x[:, :31], score[:, :31], bandwidth, backend="cpu")
        assert scans == []


@requires_cpu_extension
@pytest.mark.parametrize("n, d", [(65, 64), (300, 203), (512, 700), (520, 2080)])
@pytest.mark.parametrize("bandwidth", ["median", 1e-3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cpu_chunked_path_names_every_bad_input_from_its_output(input_scans, n, d, bandwidth, dtype):
    """Beyond the Gram path, up to 512 particles with 64 or more features go by feature chunks in fp32 or
    fp64 (IEEE fp32; 16-bit particles where AMX does not take them), or up to 256 features by the fused step
    (65 x 64, 300 x 203), whose last pass flags a non-finite phi as it writes it: the inputs are scanned only then (not at all when phi is finite), and a NaN/Inf anywhere,
    also where every weight between two particles is exactly 0, is reported by name; beyond 512 particles,
    up to 1024 with 4 or more features per particle (520 x 2080). The other paths (63 features, 513
    particles of 64 features, 520 of 2079 or 1025 of 4100: fused or GEMM tiles) are flagged too (the
    next test), and a finite call scans no input either."""
    from bmt_fast import backends

    scans = input_scans
    x = (torch.randn(n, d, dtype=torch.float64) * 50).to(dtype)
    score = torch.randn(n, d, dtype=torch.float64).to(dtype)
    cpu = backends.get("cpu")
    assert cpu.svgd_step_spreads_non_finite(x)
    bmt_fast.svgd_step(x, score, bandwidth, backend="cpu")
    bmt_fast.svgd_step(x, score, bandwidth, backend="cpu", out=torch.empty_like(x))
    assert scans == []
    assert_flagged_path_names_bad_inputs(x, score, bandwidth)
    scans.clear()  # (naming the bad inputs above scanned them)
    for rows, cols in ((n, 63), (513, 64), (520, 2079), (1025, 4100)):
        more = (torch.randn(rows, cols, dtype=torch.float64) * 50).to(dtype)
        assert cpu.svgd_step_spreads_non_finite(more)
        bmt_fast.svgd_step(more, torch.randn_like(more), bandwidth, backend="cpu")
        assert scans == []


# Shapes of every other CPU path: the fused step by rows (600 x 16, 70 x 5) and by block pairs (2100 x 8),
# GEMM tiles beyond 256 features (600 x 300; fp64 and 16-bit particles off AMX: the op scans phi once).
OTHER_PATHS_SCRIPT = """
import math, sys, torch, bmt_fast
torch.manual_seed(0)
failures = []
for n, d, dtype in [(600, 16, torch.float32), (70, 5, torch.float64), (2100, 8, torch.float32),
                    (600, 300, torch.float32), (600, 300, torch.float64), (600, 300, torch.float16)]:
    x = (torch.randn(n, d, dtype=torch.float64) * 50).to(dtype)
    score = torch.randn(n, d, dtype=torch.float64).to(dtype)
    assert bmt_fast.backends.get("cpu").svgd_step_spreads_non_finite(x)
    assert bool(torch.isfinite(bmt_fast.svgd_step(x, score, 1e-3, backend="cpu")).all())
    for bandwidth in ("median", 1e-3):
        for where in ("x", "score"):
            for i, k in {(0, 0), (n - 1, d - 1), (n // 2, d // 2)}:
                for bad in (math.nan, math.inf, -math.inf):
                    xb, sb = x.clone(), score.clone()
                    (xb if where == "x" else sb)[i, k] = bad
                    try:
                        bmt_fast.svgd_step(xb, sb, bandwidth, backend="cpu")
                        failures.append((n, d, str(dtype), bandwidth, where, i, k, bad, "no error"))
                    except ValueError as error:
                        if f"{where} contains 1 NaN/Inf" not in str(error):
                            failures.append((n, d, str(dtype), bandwidth, where, i, k, bad, str(error)))
torch.save(failures, sys.argv[1])
"""


@requires_cpu_extension
def test_cpu_fused_and_gemm_tile_paths_name_every_bad_input_from_their_output(tmp_path):
    """Many particles in few features (the fused step, by rows and by block pairs) and beyond 256 features
    (GEMM tiles), with the fused kernels and with BMT_FAST_CPU_FUSED=0 (GEMM tiles everywhere): the default
    call reads the kernel's flag (or one scan of phi) instead of scanning x and score first, so a NaN/Inf at
    the first particle, the last value or the middle, in x or in score, with the median rule and with an H
    so small that every weight between two particles is exactly 0, must make phi non-finite and be named."""
    results = run_cpu_variants(tmp_path, OTHER_PATHS_SCRIPT, {"fused": {}, "gemm": {"BMT_FAST_CPU_FUSED": "0"}})
    assert results == {"fused": [], "gemm": []}


def checked(x, score, bandwidth=None, algorithm="auto"):
    """torch.ops.bmt_fast.svgd_step_into on a fresh out: (phi, finite)."""
    out = torch.empty_like(x)
    finite = torch.ops.bmt_fast.svgd_step_into(x, score, bandwidth, algorithm, out=out)
    assert finite.dtype == torch.bool and finite.shape == ()
    return out, bool(finite)


@requires_cpu_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, d", [(1, 5), (4, 203), (13, 16), (64, 1000), (65, 37)])
def test_svgd_step_into_reports_whether_phi_is_finite(n, d, dtype):
    """torch.ops.bmt_fast.svgd_step_into writes svgd_step's phi bit for bit and returns a flag equal to
    isfinite(phi).all(): tracked in registers on the CPU Gram path (these shapes up to 64 particles) and AMX
    path (bf16 at n = 65 on a CPU with AMX), by a scan on the tiled one (n = 65 otherwise). Bad values at the shift row, a
    ragged last vector and the middle, in x and in score."""
    torch.manual_seed(n * d)
    x, score = torch.randn(n, d, dtype=torch.float64).to(dtype), torch.randn(n, d, dtype=torch.float64).to(dtype)
    for bandwidth in (None, torch.tensor(0.5, dtype=torch.float64)):
        phi, finite = checked(x, score, bandwidth)
        assert finite
        torch.testing.assert_close(phi, torch.ops.bmt_fast.svgd_step(x, score, bandwidth), rtol=0, atol=0)
        for which in (0, 1):
            for i, k in {(0, 0), (n - 1, d - 1), (n // 2, d // 2)}:
                for bad in (math.nan, math.inf, -math.inf):
                    xb, sb = x.clone(), score.clone()
                    (xb, sb)[which][i, k] = bad
                    phi, finite = checked(xb, sb, bandwidth)
                    assert not finite and not bool(torch.isfinite(phi).all()), (which, i, k, bad)


@requires_cpu_extension
@pytest.mark.parametrize("algorithm", ["gram", "tiled"])
def test_svgd_step_into_counts_values_that_overflow_float16(algorithm):
    """fp16 inputs accumulate in fp32: a phi value finite in fp32 but beyond fp16's range is stored as
    Inf, and the flag says so (the Gram path compares against the largest value that rounds to finite)."""
    x = torch.zeros(2, 3)
    x[1, 0] = 1e-5  # r = 1e-5 apart at H = 2e-10: the repulsion, k / (n r) ~ 3e4, pushes x_1 past 65504
    score = torch.full((2, 3), 6e4)
    h = torch.tensor(2e-10)
    wide, ok = checked(x, score, h, algorithm)
    assert ok and float(wide.abs().max()) > 65520  # finite in fp32 ...
    phi, finite = checked(x.half(), score.half(), h, algorithm)
    assert bool(torch.isinf(phi).any()) and not finite  # ... Inf once stored as fp16
    assert not bool(torch.isnan(phi).any())


@requires_cpu_extension
def test_opcheck_svgd_step_into():
    x, score = good(9, 5)
    for algorithm in ("auto", "tiled", "gram"):
        out = torch.empty_like(x)
        torch.library.opcheck(torch.ops.bmt_fast.svgd_step_into.default, (x, score, None, algorithm), {"out": out})


@requires_cpu_extension
@pytest.mark.parametrize(
    "make_out, error, match",
    [
        (lambda x: torch.empty(x.shape[0], x.shape[1] + 1), ValueError, "out must have the shape of x"),
        (lambda x: torch.empty_like(x, dtype=torch.float64), TypeError, "out must have the dtype of x"),
        (lambda x: torch.empty(x.shape[1], x.shape[0]).T, ValueError, "out must be contiguous"),
        (lambda x: x, ValueError, "out must not (overlap|share memory with) x"),
    ],
)
def test_svgd_step_into_rejects_a_bad_out(make_out, error, match):
    x, score = good(5, 6)
    out = make_out(x)
    with pytest.raises(RuntimeError, match=match):  # the op itself (c10 errors surface as RuntimeError)
        torch.ops.bmt_fast.svgd_step_into(x, score, None, "auto", out=out)
    with pytest.raises(error, match=match):  # the public API, before anything runs
        bmt_fast.svgd_step(x, score, out=out)


@requires_cpu_extension
def test_out_may_be_a_view_of_the_inputs_buffer_apart_from_them():
    """out= in the same buffer as x and score, in rows of its own: taken (the op's own check compares memory
    ranges, not buffers), phi as without out=; one row shared with x or score: refused, by the API and by
    the op; so is an out inside a strided score's span."""
    x, score = good(5, 6)
    expected = bmt_fast.svgd_step(x, score)
    buffer = torch.cat([x, score, torch.zeros(5, 6)])
    phi = bmt_fast.svgd_step(buffer[:5], buffer[5:10], out=buffer[10:])
    assert phi.data_ptr() == buffer[10:].data_ptr()
    torch.testing.assert_close(phi, expected, rtol=0, atol=0)
    torch.testing.assert_close(buffer[:10], torch.cat([x, score]), rtol=0, atol=0)  # inputs untouched
    for xs, ss, out, name in [(buffer[:5], buffer[5:10], buffer[4:9], "x"), (buffer[:5], buffer[6:11], buffer[10:], "score")]:
        with pytest.raises(ValueError, match=f"out must not share memory with {name}"):
            bmt_fast.svgd_step(xs, ss, out=out)
        with pytest.raises(RuntimeError, match=f"out must not overlap {name}"):
            torch.ops.bmt_fast.svgd_step_into(xs, ss, None, "auto", out=out)
    strided = torch.cat([score, torch.zeros(5, 6)], 1)[:, :6]  # score's rows 12 apart, out from the gap after row 0
    with pytest.raises(ValueError, match="out must not share memory with score"):
        bmt_fast.svgd_step(x, strided, out=torch.as_strided(strided, (5, 6), (6, 1), 6))


@requires_cpu_extension
def test_cpu_gram_path_returns_an_overflowed_phi_of_finite_inputs():
    """Finite inputs whose phi overflows are not an input error: phi comes back as the kernels made it.
    (This had been particles 1e10 apart at H = 1e-30, whose phi is finite, 0.25 to 0.5: the folded sums'
    (2/H) x overflowed, which is now named: test_a_bandwidth_too_small_for_the_folded_sums_is_named.)"""
    x = torch.zeros(4, 8)
    x[1] = 2e37  # (2/H) |x - centre| stays below fp32's largest value, score - (2/H) (x - centre) does not
    score = torch.full((4, 8), torch.finfo(torch.float32).max)
    phi = bmt_fast.svgd_step(x, score, 1.0, backend="cpu")
    assert not bool(torch.isfinite(phi).all())
    unchecked = bmt_fast.svgd_step(x, score, 1.0, backend="cpu", check_inputs=False)
    torch.testing.assert_close(phi, unchecked, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_finite_check_is_exact_where_the_sum_overflows(dtype):
    from bmt_fast._validation import all_finite

    big = torch.finfo(dtype).max
    t = torch.full((3, 4), big, dtype=dtype)  # finite, but the sum overflows to inf
    assert not torch.isfinite(t.sum())
    assert all_finite(t)
    t[0, 1] = -big  # big - big: sums can cancel; still finite
    assert all_finite(t)
    for bad in (math.inf, -math.inf, math.nan):
        u = t.clone()
        u[2, 3] = bad
        assert not all_finite(u)
    u = torch.zeros(5, dtype=dtype)
    u[0], u[1] = math.inf, -math.inf  # +inf and -inf: the sum is NaN, not finite
    assert not all_finite(u)
    assert all_finite(torch.randn(6, 5).to(dtype).requires_grad_(dtype.is_floating_point))
    assert all_finite(torch.empty(0, 5, dtype=dtype))


def test_rbf_kernel_scans_each_distinct_input_once(input_scans):
    """rbf_kernel(x, x) scans x once (the second scan was a third of the call at 16 x 76,800); a y of its own,
    even one holding the same values, is scanned and named."""
    x = torch.randn(5, 4)
    k = bmt_fast.rbf_kernel(x, x, 2.0)
    assert input_scans == ["x"]
    torch.testing.assert_close(k, bmt_fast.rbf_kernel(x, None, 2.0), rtol=0, atol=0)
    input_scans.clear()
    bmt_fast.rbf_kernel(x, x.clone(), 2.0)
    assert input_scans == ["x", "y"]
    bad = x.clone()
    bad[2, 1] = math.nan
    with pytest.raises(ValueError, match="x contains 1 NaN/Inf"):
        bmt_fast.rbf_kernel(bad, bad, 2.0)
    with pytest.raises(ValueError, match="y contains 1 NaN/Inf"):
        bmt_fast.rbf_kernel(x, bad, 2.0)


def test_finite_check_can_be_skipped(cpu_backend):
    x, score = good()
    score[0, 0] = math.nan
    phi = bmt_fast.svgd_step(x, score, backend=cpu_backend, check_inputs=False)
    assert torch.isnan(phi).any()  # the caller asked for no check: NaN propagates, nothing is hidden


@pytest.mark.parametrize("bandwidth", [0.0, -1.0, math.nan, math.inf, torch.tensor(-2.0), torch.tensor(math.nan)])
def test_bad_bandwidth_values(cpu_backend, bandwidth):
    x, score = good()
    with pytest.raises(ValueError, match="bandwidth must be positive and finite"):
        bmt_fast.svgd_step(x, score, bandwidth, backend=cpu_backend)


@pytest.mark.parametrize(
    "bandwidth, error, match",
    [
        ("mean", ValueError, "bandwidth must be"),
        (True, TypeError, "bandwidth must be"),
        (None, TypeError, "bandwidth must be"),
        (torch.ones(2), ValueError, "bandwidth tensor must hold one value"),
        (torch.tensor(2), TypeError, "bandwidth tensor must be floating point"),
    ],
)
def test_bad_bandwidth_types(bandwidth, error, match):
    x, score = good()
    with pytest.raises(error, match=match):
        bmt_fast.svgd_step(x, score, bandwidth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_bandwidth_below_the_smallest_normal_number_of_the_arithmetic(cpu_backend, dtype):
    """1/H overflows below the smallest normal number of the kernels' arithmetic (float32; float64 for float64
    particles): such an H is refused by name (it gave an all-NaN phi and K), the smallest one still runs and
    gives the step's limit for particles that no longer see each other, score / n."""
    x, score = good(n=5, d=3)
    x, score = x.to(dtype), score.to(dtype)
    tiny = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
    for h in (tiny / 4, torch.tensor(tiny / 4, dtype=torch.float64)):
        with pytest.raises(ValueError, match="is below the smallest normal torch.float.. number"):
            bmt_fast.svgd_step(x, score, h, backend=cpu_backend)
        with pytest.raises(ValueError, match="is below the smallest normal"):
            bmt_fast.rbf_kernel(x, score, h, backend=cpu_backend)
    phi = bmt_fast.svgd_step(x, score, 2 * tiny, backend=cpu_backend)
    torch.testing.assert_close(phi, (score.double() / 5).to(dtype), rtol=torch.finfo(dtype).eps, atol=0)
    assert torch.equal(bmt_fast.rbf_kernel(x, None, 2 * tiny, backend=cpu_backend), torch.eye(5, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_bandwidth_too_small_for_the_folded_sums_is_named(cpu_backend, dtype):
    """Above the smallest normal number, (2/H) (x - centre) still overflows the compiled kernels' folded sums
    for particles far enough apart: Inf times a kernel value of 0, an all-NaN phi with no error (the
    reference's unfolded sums gave score / n). Named once the kernel's flag says phi is not finite (no pass
    on good calls), also for one set of a batch; unchecked, phi stays NaN."""
    x, score = good(n=5, d=3, dtype=dtype)
    x = x * 10
    h = 1.5 * torch.finfo(dtype).tiny
    if cpu_backend == "torch":  # unfolded: exact, the particles do not interact
        torch.testing.assert_close(bmt_fast.svgd_step(x, score, h, backend="torch"), score / 5)
        return
    with pytest.raises(ValueError, match=f"bandwidth {h:g} is too small for these {dtype} particles"):
        bmt_fast.svgd_step(x, score, h, backend=cpu_backend)
    with pytest.raises(ValueError, match="is too small for these"):
        bmt_fast.svgd_step(x, score, h, backend=cpu_backend, out=torch.empty_like(x))
    with pytest.raises(ValueError, match="is too small for these"):  # (the second set's phi)
        torch.func.vmap(lambda a, b: bmt_fast.svgd_step(a, b, h, backend=cpu_backend))(
            torch.stack([x / 1e6, x]), torch.stack([score, score])
        )
    assert torch.isnan(bmt_fast.svgd_step(x, score, h, backend=cpu_backend, check_inputs=False)).any()
    # far from that limit the same particles step as the reference does
    torch.testing.assert_close(bmt_fast.svgd_step(x, score, 1e-3, backend=cpu_backend), score / 5)


def test_fold_may_overflow_is_a_necessary_condition_from_the_shape_alone():
    """fold_may_overflow (no pass over x: it decides whether a backend without a finiteness flag scans phi)
    holds wherever fold_overflows does, and not for any ordinary H."""
    from bmt_fast._validation import fold_may_overflow, fold_overflows

    generator = torch.Generator().manual_seed(0)
    overflows = 0
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        largest = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max
        for n, d in [(2, 1), (300, 2), (40, 128), (7, 409_600)]:
            for scale in (1.0, 1e6, 1e15, 1e18):
                x = (torch.randn(n, d, generator=generator, dtype=torch.float64) * scale).to(dtype)
                for h in (1e-3, 1e-30, 1e-37, 1.5e-38, 1e-300, 4 * n * scale * 10 / largest):
                    if fold_overflows(x, h):
                        overflows += 1
                        assert fold_may_overflow(x, h), (dtype, n, d, scale, h)
        assert not fold_may_overflow(torch.ones(300, 128, dtype=dtype), 1e-10)
    assert overflows >= 20  # (the cases reach the overflow)


@requires_cpu_extension
def test_the_fold_overflow_counts_duplicated_particles_and_spares_huge_ones():
    """Duplicated particles (k = 1) add (2/H)|x - c| once per copy: 20 copies each of two points overflowed the
    folded sums (phi +-inf, no error) where one term did not; particles so large that their squared distances
    overflow fail at any H, so that H is not blamed (their NaN phi without an error is the documented limit);
    in a batch the first bad set's error comes first, as in a loop of single calls."""
    x = torch.cat([torch.full((20, 2), -100.0), torch.full((20, 2), 100.0)])
    h = 2 * 100 / (0.2 * torch.finfo(torch.float32).max)
    torch.testing.assert_close(bmt_fast.svgd_step(x, torch.ones(40, 2), h, backend="torch"), torch.full((40, 2), 0.5))
    with pytest.raises(ValueError, match="is too small for these torch.float32 particles: .* summed over the particles"):
        bmt_fast.svgd_step(x, torch.ones(40, 2), h, backend="cpu")
    huge = torch.randn(40, 2) * 1e37
    phi = bmt_fast.svgd_step(huge, torch.ones(40, 2), 1.0, backend="cpu")  # (no error about H)
    assert not bool(torch.isfinite(phi).all())
    xs = torch.stack([x, x])
    xs[1, 3, 0] = float("nan")
    hs = torch.tensor([h, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="is too small for these"):  # set 0 first, as a loop would fail
        torch.func.vmap(lambda a, b, c: bmt_fast.svgd_step(a, b, c, backend="cpu"))(xs, torch.ones_like(xs), hs)


def test_bandwidth_beyond_the_float_range():
    x, score = good()
    with pytest.raises(ValueError, match="bandwidth must be positive and finite, got int beyond the float range"):
        bmt_fast.svgd_step(x, score, 10**400)


def test_unchecked_bad_tensor_bandwidth_gives_nan_in_the_torch_backend():
    """check_inputs=False skips the host read of H: an invalid one gives NaN (as on CUDA and Triton), not
    numbers of the wrong sign or scale."""
    x, score = good()
    for h in (torch.tensor(-1.0), torch.tensor(0.0), torch.tensor(math.inf)):
        assert torch.isnan(bmt_fast.svgd_step(x, score, h, backend="torch", check_inputs=False)).all()
        assert torch.isnan(bmt_fast.rbf_kernel(x, None, h, backend="torch", check_inputs=False)).all()


def test_meta_tensors_pass_the_default_checks():
    """The default call (check_inputs=True) on meta tensors: shapes only, no values to scan or read."""
    m = torch.empty(4, 3, device="meta")
    assert bmt_fast.svgd_step(m, m).shape == (4, 3)
    assert bmt_fast.svgd_step(m, m, torch.tensor(2.0, device="meta")).device.type == "meta"
    assert bmt_fast.rbf_kernel(m, None, 1.0).shape == (4, 4)
    assert bmt_fast.median_bandwidth(m).shape == ()


def test_unknown_or_unavailable_backend():
    x, score = good()
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        bmt_fast.svgd_step(x, score, backend="gpu")
    if "cuda" not in bmt_fast.available_backends():
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            bmt_fast.svgd_step(x, score, backend="cuda")


@pytest.mark.parametrize(
    "capability,arch_list,runs",
    [
        ((9, 0), "9.0", True),
        ((8, 6), "8.0;9.0", True),  # machine code of 8.0 runs on 8.x
        ((8, 0), "8.6", False),
        ((8, 0), "9.0", False),  # (the CI build on an A100)
        ((10, 0), "8.0;9.0", False),  # no PTX: a Blackwell device had got "no kernel image is available"
        ((10, 0), "8.0;9.0+PTX", True),
        ((12, 0), "8.0 9.0+PTX", True),
        ((8, 9), "9.0+PTX", False),  # PTX runs on newer devices only
        ((9, 0), "9.0a", True),
        ((10, 0), "9.0a+PTX", False),  # arch-specific code: that capability alone
        ((10, 3), "10.0f", True),
        ((9, 0), "Hopper", None),  # a named architecture: not known
    ],
)
def test_cuda_arch_runs(capability, arch_list, runs):
    from bmt_fast.backends import cuda_arch_runs

    assert cuda_arch_runs(capability, arch_list) is runs


def test_a_cuda_build_without_code_for_the_device_is_unavailable(monkeypatch):
    """The CUDA backend on a device its build has no code for: unavailable with the reason, so "auto" passes
    it by (it had been chosen, and every op failed in the launch: "no kernel image is available")."""
    from bmt_fast import _extension, backends

    status = _extension.ExtensionStatus("_C_cuda", module=object(), build_info={"arch_list": "8.0;9.0"})
    cuda = backends.CompiledBackend.__new__(backends.CompiledBackend)
    cuda.name, cuda.status, cuda.device_types = "cuda", status, ("cuda",)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (10, 0))
    assert cuda.unavailable_reason() == (
        "the CUDA extension holds code for compute capabilities '8.0;9.0', none of which runs on the current "
        'device (compute capability 10.0): rebuild with BMT_FAST_CUDA_ARCH_LIST="10.0" (README, "Install")'
    )
    assert not cuda.supports(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    assert cuda.unavailable_reason() == "" and cuda.supports(torch.device("cuda"))


def test_rbf_kernel_bad_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="y must have the event shape of x"):
        bmt_fast.rbf_kernel(x, torch.randn(5, 2))
    with pytest.raises(TypeError, match="y must have the dtype of x"):
        bmt_fast.rbf_kernel(x, torch.randn(5, 3, dtype=torch.float64))
    y = torch.randn(5, 3)
    y[0, 0] = math.inf
    with pytest.raises(ValueError, match="y contains 1 NaN/Inf"):
        bmt_fast.rbf_kernel(x, y)


def test_median_bandwidth_bad_inputs():
    with pytest.raises(ValueError, match="method must be one of"):
        bmt_fast.median_bandwidth(torch.randn(4, 3), method="approx")
    with pytest.raises(ValueError, match="num_pairs must be a positive int, got True"):
        bmt_fast.median_bandwidth(torch.randn(300, 3), method="sampled", num_pairs=True)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        bmt_fast.median_bandwidth(torch.randn(300, 3), method="sampled", generator=3)
    with pytest.raises(ValueError, match="x contains 1 NaN/Inf"):
        bmt_fast.median_bandwidth(torch.tensor([[0.0], [math.nan]]))
    with pytest.raises(TypeError, match="x must be a dense .strided. tensor, got layout torch.sparse_coo"):
        bmt_fast.median_bandwidth(torch.randn(4, 3).to_sparse())
    with pytest.raises(TypeError, match="y must be a dense"):
        bmt_fast.rbf_kernel(torch.randn(4, 3), torch.randn(4, 3).to_sparse())
    with pytest.raises(TypeError, match="out must be a dense"):
        bmt_fast.svgd_step(torch.randn(4, 3), torch.randn(4, 3), out=torch.zeros(4, 3).to_sparse())
    for layout in (torch.strided, torch.jagged):  # (torch's internal error before; jagged: to_dense() advised)
        nested = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(3, 3)], layout=layout)
        for call in (lambda: bmt_fast.median_bandwidth(nested), lambda: bmt_fast.rbf_kernel(nested),
                     lambda: bmt_fast.svgd_step(nested, nested)):  # fmt: skip
            with pytest.raises(TypeError, match=r"x must be a dense .strided. tensor, got a nested tensor: pass x.to_padded_tensor"):
                call()
    # numpy integers count as ints (as numpy floats count as floats for the bandwidth); bools do not
    import numpy as np

    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    sampled = bmt_fast.median_bandwidth(x, method="sampled", num_pairs=np.int64(100), generator=generator)
    generator.manual_seed(1)
    assert float(sampled) == float(bmt_fast.median_bandwidth(x, method="sampled", num_pairs=100, generator=generator))
    with pytest.raises(ValueError, match="num_pairs must be a positive int, got np.True_|num_pairs must be a positive int, got True"):
        bmt_fast.median_bandwidth(x, method="sampled", num_pairs=np.bool_(True))


@requires_cpu_extension
def test_direct_op_calls_check_arguments():
    """The registered ops check their own arguments too (readable TORCH_CHECK messages)."""
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="score must have the shape of x"):
        torch.ops.bmt_fast.svgd_step(x, torch.randn(4, 2), None)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        torch.ops.bmt_fast.svgd_step(torch.randn(4), torch.randn(4), None)
    with pytest.raises(RuntimeError, match="bandwidth must be positive and finite"):
        torch.ops.bmt_fast.svgd_step(x, x, torch.tensor(0.0))
    tiny = torch.tensor(1e-39, dtype=torch.float64)  # below float32's smallest normal, above float64's
    with pytest.raises(RuntimeError, match="bandwidth 9.99.*e-40 is below the smallest normal float32 number"):
        torch.ops.bmt_fast.svgd_step(x, x, tiny)
    with pytest.raises(RuntimeError, match="is below the smallest normal float32 number"):
        torch.ops.bmt_fast.rbf_kernel(x, x, tiny)
    phi = torch.ops.bmt_fast.svgd_step(x.double(), x.double(), tiny)  # float64 arithmetic: fine
    torch.testing.assert_close(phi, x.double() / 4, rtol=1e-15, atol=0)
    with pytest.raises(RuntimeError, match='algorithm must be "auto", "tiled" or "gram"'):
        torch.ops.bmt_fast.svgd_step(x, x, None, "fast")
    with pytest.raises(RuntimeError, match="y must have d = 3 columns"):
        torch.ops.bmt_fast.rbf_kernel(x, torch.randn(2, 4), torch.tensor(1.0))


def test_inputs_are_not_modified(cpu_backend):
    x, score = good(n=70, d=40)
    x0, s0 = x.clone(), score.clone()
    bmt_fast.svgd_step(x, score, backend=cpu_backend)
    bmt_fast.rbf_kernel(x, score, backend=cpu_backend)
    assert torch.equal(x, x0) and torch.equal(score, s0)


def test_the_fake_tensor_shortcut_answers_as_torch_does():
    """check_out's _maybe_fake answers a plain tensor at once and hands everything else to torch's is_fake: the
    same answer for a plain tensor, a FakeTensor, a meta tensor, and functionalization wrappers of a real and
    of a fake tensor."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    from bmt_fast._validation import _maybe_fake

    plain = torch.randn(3, 4)
    with FakeTensorMode() as mode:
        fake = torch.empty(3, 4)
    cases = [plain, fake, torch.empty(3, 4, device="meta"), torch._to_functional_tensor(plain)]
    with mode:
        cases.append(torch._to_functional_tensor(fake))
    answers = [(_maybe_fake(t), is_fake(t)) for t in cases]
    assert all(mine == torch_s for mine, torch_s in answers), answers
    assert [mine for mine, _ in answers] == [False, True, False, False, True]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_checked_calls_trace_under_fake_tensors_make_fx_and_linearize(backend):
    """With the default check_inputs=True the public ops take fake tensors (FakeTensorMode, make_fx's fake
    tracing) and make_fx's tracing (torch.func.linearize) as they take meta tensors: shapes, no value scans
    (they had raised DataDependentOutputException / "get value out of a tracing tensor" from the scans'
    .item()); a learnable bandwidth (requires_grad) is read without autograd's warning."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    x, score = good(n=8, d=4)
    with FakeTensorMode():
        fx, fs = torch.empty(8, 4), torch.empty(8, 4)
        assert bmt_fast.svgd_step(fx, fs, backend=backend).shape == (8, 4)
        assert bmt_fast.svgd_step(fx, fs, torch.tensor(1.5), backend=backend, out=torch.empty(8, 4)).shape == (8, 4)
        assert bmt_fast.rbf_kernel(fx, backend=backend).shape == (8, 8)
        assert bmt_fast.median_bandwidth(fx, backend=backend).shape == ()
    traced = make_fx(lambda a, b: bmt_fast.svgd_step(a, b, backend=backend), tracing_mode="fake")(x, score)
    torch.testing.assert_close(traced(x, score), reference.svgd_step(x, score, None), rtol=1e-4, atol=1e-5)
    value, tangent_of = torch.func.linearize(lambda a: bmt_fast.rbf_kernel(a, None, 1.5, backend=backend), x)
    tangent = torch.randn_like(x)
    _, expected = torch.func.jvp(lambda a: reference.rbf_kernel(a, None, torch.tensor(1.5)), (x,), (tangent,))
    torch.testing.assert_close(value, reference.rbf_kernel(x, None, torch.tensor(1.5)))
    torch.testing.assert_close(tangent_of(tangent), expected, rtol=1e-4, atol=1e-5)
    # a tensor bandwidth made outside: fake under FakeTensorMode, traced by make_fx and linearize
    h = torch.tensor(1.5)
    mode = FakeTensorMode()
    fx, fh = mode.from_tensor(x), mode.from_tensor(h)
    with mode:
        assert bmt_fast.rbf_kernel(fx, None, fh, backend=backend).shape == (8, 8)
    traced = make_fx(lambda a, b, c: bmt_fast.svgd_step(a, b, c, backend=backend), tracing_mode="fake")(x, score, h)
    torch.testing.assert_close(traced(x, score, h), reference.svgd_step(x, score, h))
    value, tangent_of = torch.func.linearize(lambda a: bmt_fast.rbf_kernel(a, None, h, backend=backend), x)
    torch.testing.assert_close(tangent_of(tangent), expected, rtol=1e-4, atol=1e-5)
    h = torch.tensor(1.5, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(bmt_fast.svgd_step(x, score, h, backend=backend), reference.svgd_step(x, score, torch.tensor(1.5)))
    # a NaN is still named where values exist
    with pytest.raises(ValueError, match="x contains 1 NaN/Inf"):
        bmt_fast.svgd_step(torch.where(torch.arange(32).view(8, 4) == 5, float("nan"), x), score, backend=backend)


# In one child Python, each CPU switch in the order the ops read them (a switch whose read failed is read again
# at the next call): a bad value fails every kind of call, small ones included, naming the variable, and leaves
# out= as it was; once the variable is unset the same calls run.
BAD_SWITCHES_SCRIPT = """
import os, torch, bmt_fast
from bmt_fast import _extension
torch.manual_seed(0)
x, s = torch.randn(6, 3), torch.randn(6, 3)
xb, sb = torch.randn(2, 6, 3), torch.randn(2, 6, 3)
def calls():
    out = torch.full_like(x, 7.0)
    outb = torch.full_like(xb, 7.0)
    yield "step", lambda: bmt_fast.svgd_step(x, s, 1.0, backend="cpu"), None
    yield "step median", lambda: bmt_fast.svgd_step(x, s, backend="cpu"), None
    yield "step out=", lambda: bmt_fast.svgd_step(x, s, 1.0, backend="cpu", out=out), out
    yield "batched", lambda: torch.ops.bmt_fast.svgd_step_batched_into(xb, sb, torch.ones(2), out=outb), outb
    yield "rbf_kernel", lambda: bmt_fast.rbf_kernel(x, s, 1.0, backend="cpu"), None
    yield "rbf_kernel grad", lambda: bmt_fast.rbf_kernel(x.requires_grad_(), x, 1.0, backend="cpu").sum().backward(), None
    yield "median", lambda: bmt_fast.median_bandwidth(x, backend="cpu"), None
    yield "build_info", lambda: _extension.CPU.module.build_info(), None
cases = [("BMT_FAST_CPU_ISA", "v9", "must be base, v3 or v4"), ("BMT_FAST_CPU_AVX512BF16", "on", "must be 0 or 1"),
         ("BMT_FAST_CPU_AMX", "off", "must be 0 or 1"), ("BMT_FAST_CPU_FUSED", "false", "must be 0 or 1"),
         ("BMT_FAST_CPU_SERIAL_MAX_WORK", "1e6", "must be a non-negative whole number"),
         ("BMT_FAST_CPU_SERIAL_MAX_WORK", "-1", "must be a non-negative whole number"),
         ("BMT_FAST_MEDIAN_WINDOW", "yes", "must be 0, 1 or require")]
for name, value, says in cases:
    os.environ[name] = value
    for what, call, out in calls():
        try:
            call()
        except RuntimeError as error:
            assert f"{name} {says}" in str(error) and value in str(error), (name, what, str(error)[:300])
        else:
            raise AssertionError(f"{name}={value}: {what} ran")
        assert out is None or bool((out == 7.0).all()), (name, what, "out= was written")
        x.requires_grad_(False)
    del os.environ[name]
for name, _, _ in cases:  # empty is unset (BMT_FAST_CPU_ISA="" had been refused, unlike the others)
    os.environ[name] = ""
for what, call, out in calls():  # every switch now read, at its default
    call()
    assert out is None or bool(torch.isfinite(out).all()), what
    x.requires_grad_(False)
print("ok")
"""


@requires_cpu_extension
def test_bad_cpu_switches_fail_every_call_by_name(tmp_path):
    """A typo in a BMT_FAST_CPU_* switch (or BMT_FAST_MEDIAN_WINDOW) is an error at every CPU op call, small
    calls that never reach the path it steers included, not a silent default ("false" once ran the fused
    kernels, "1e6" set the one-thread bound to 1); `python -m bmt_fast.info` reports it and exits with 1."""
    import subprocess
    import sys

    from helpers import subprocess_env

    script = tmp_path / "switches.py"
    script.write_text(BAD_SWITCHES_SCRIPT)
    switches = ("BMT_FAST_CPU_ISA", "BMT_FAST_CPU_AVX512BF16", "BMT_FAST_CPU_AMX", "BMT_FAST_CPU_FUSED",
                "BMT_FAST_CPU_SERIAL_MAX_WORK", "BMT_FAST_MEDIAN_WINDOW")  # fmt: skip
    env = {k: v for k, v in subprocess_env().items() if k not in switches}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
    info = subprocess.run([sys.executable, "-m", "bmt_fast.info"], env={**env, "BMT_FAST_CPU_FUSED": "off"},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert info.returncode == 1, (info.stdout, info.stderr[-2000:])
    assert 'CPU settings: bmt_fast: BMT_FAST_CPU_FUSED must be 0 or 1, got "off"' in info.stdout, info.stdout
    assert "available backends:" in info.stdout  # the rest is still reported
