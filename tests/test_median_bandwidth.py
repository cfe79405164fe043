"""median_bandwidth: exact (numpy convention) on every backend, and the sampled estimate's error."""

import math

import numpy as np
import pytest
import torch
from helpers import amx_shift, requires_amx, requires_cpu_extension, run_cpu_variants

import bmt_fast
from bmt_fast import reference


def numpy_rule(x: torch.Tensor) -> float:
    a = x.double().numpy()
    d2 = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    return max(float(np.median(d2)) / math.log(len(a) + 1), reference.BANDWIDTH_FLOOR)


@pytest.mark.parametrize("n,d", [(1, 4), (2, 1), (3, 3), (10, 2), (65, 7), (128, 33), (513, 5), (16, 30_000)])
def test_exact_matches_numpy_median(cpu_backend, n, d):
    x = torch.randn(n, d, dtype=torch.float64) * 2 + 10
    h = bmt_fast.median_bandwidth(x, backend=cpu_backend)
    assert h.dim() == 0 and h.dtype == torch.float64
    assert math.isclose(float(h), numpy_rule(x), rel_tol=1e-12)


def test_ties_and_duplicates(cpu_backend):
    x = torch.tensor([[0.0], [0.0], [1.0], [1.0], [3.0]], dtype=torch.float64)
    assert math.isclose(float(bmt_fast.median_bandwidth(x, backend=cpu_backend)), numpy_rule(x), rel_tol=1e-12)


@requires_cpu_extension
@pytest.mark.parametrize("algorithm", ["tiled", "gram"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [4, 31, 64, 600])
def test_compiled_algorithms(algorithm, dtype, n):
    x = torch.randn(n, 9).to(dtype)
    h = torch.ops.bmt_fast.median_bandwidth(x, algorithm)
    assert h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Exact selection over the kernel's own distances: within rounding of the distance computation.
    assert math.isclose(float(h), numpy_rule(x), rel_tol=1e-12 if dtype == torch.float64 else 1e-5)


@requires_cpu_extension
@pytest.mark.parametrize("n", [2, 99, 100, 128, 129, 512, 513])  # n^2 odd and even; up to 128 the CPU selects
# over the stored fused distances (kFusedSelectMaxParticles; 512 on GEMM tiles, kMedianSelectMaxParticles),
# beyond that by the window (or radix passes over recomputed tiles where it misses)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
def test_tiled_median_is_exact_on_both_sides_of_the_selection_limit(n, dtype, ties):
    """With ties (integer coordinates: repeated particles, repeated and zero distances) every distance is
    exact in fp64, so both selections must hit numpy's median of the n x n matrix exactly; in fp32 the
    centred coordinates (shifted by the mean) round, so the middle distances carry fp32 rounding too (129
    and 130 particles: 1.9e-7 and 1.8e-7 of H)."""
    torch.manual_seed(n)
    x = torch.randn(n, 3, dtype=torch.float64) * 3
    x = (x.round() if ties else x).to(dtype)
    h = float(torch.ops.bmt_fast.median_bandwidth(x, "tiled"))
    # fp32: H itself is returned in fp32 (one rounding); its distances carry fp32 rounding
    tolerance = 1e-14 if dtype == torch.float64 else 1e-6
    assert math.isclose(h, numpy_rule(x), rel_tol=tolerance)


@requires_cpu_extension
@pytest.mark.parametrize("algorithm", ["tiled", "gram"])
def test_median_selection_on_equal_ordered_and_tied_distances(algorithm):
    """The CPU's selection among up to 6144 distances (a quickselect whose partitions do not branch on the
    keys, std::nth_element below 32 keys) on distances all equal (every key the pivot), all but a few equal,
    ordered along a line both ways, and lattice ties: numpy's median exactly (float64, integer coordinates)."""
    torch.manual_seed(3)
    cases = [
        torch.zeros(40, 2),  # every distance 0: the floor
        torch.cat([torch.full((60, 2), 2.0), torch.ones(1, 2)]),  # 60 distances of 2, the rest 0
        torch.arange(100.0).reshape(100, 1),
        torch.arange(111.0).flip(0).reshape(111, 1),
        torch.randint(0, 3, (90, 2)).double(),
        torch.randint(0, 2, (33, 1)).double(),
    ]
    for x in cases:
        x = x.double()
        assert float(torch.ops.bmt_fast.median_bandwidth(x, algorithm)) == numpy_rule(x), tuple(x.shape)


@requires_cpu_extension
# (520 x 3000: many features, so few pairs sampled (~390) and a wide window)
@pytest.mark.parametrize("n,d,dtype,ties", [(513, 3, torch.float64, True), (600, 5, torch.float32, False),
                                            (1500, 2, torch.float32, True), (2100, 17, torch.float64, False),
                                            (520, 3000, torch.float32, False)])  # fmt: skip
def test_windowed_median_equals_the_radix_passes_bit_for_bit(monkeypatch, n, d, dtype, ties):
    """Beyond 512 particles a sample of pairs brackets the median and one pass keeps the distances in the
    bracket; the values selected are the tiles' own, so the result is the radix passes' exactly
    (BMT_FAST_MEDIAN_WINDOW=0 takes those)."""
    torch.manual_seed(n)
    x = torch.randn(n, d, dtype=torch.float64) * 3
    x = (x.round() if ties else x).to(dtype)
    monkeypatch.setenv("BMT_FAST_MEDIAN_WINDOW", "require")  # a miss of the window is an error, not the fallback
    windowed = float(torch.ops.bmt_fast.median_bandwidth(x, "tiled"))
    monkeypatch.setenv("BMT_FAST_MEDIAN_WINDOW", "0")
    radix = float(torch.ops.bmt_fast.median_bandwidth(x, "tiled"))
    assert windowed == radix
    assert math.isclose(windowed, numpy_rule(x), rel_tol=1e-14 if dtype == torch.float64 else 1e-6)


@requires_cpu_extension
def test_windowed_median_takes_a_second_pass_for_ties_and_falls_back_beyond_its_room(monkeypatch):
    """Two tight clusters: half of all distances are 0 and half the same positive value, so the bracket
    around the middle ranks holds every distance, more than the room first made for it. Within
    kMedianWindowMaxBytes (600 particles) a second pass collects them all; beyond (9000 particles: 40M
    distances) the radix passes answer, and BMT_FAST_MEDIAN_WINDOW=require reports the miss."""
    for n, dtype in ((600, torch.float64), (9000, torch.float32)):
        x = torch.zeros(n, 2, dtype=dtype)
        x[n // 2 :, 0] = 3.0
        monkeypatch.delenv("BMT_FAST_MEDIAN_WINDOW", raising=False)
        h = float(torch.ops.bmt_fast.median_bandwidth(x, "tiled"))
        # (n^2 / 2 zeros, diagonal included, and n^2 / 2 nines: numpy's median is their mean, 4.5)
        assert math.isclose(h, 4.5 / math.log(n + 1), rel_tol=1e-6 if dtype == torch.float32 else 1e-15)
        monkeypatch.setenv("BMT_FAST_MEDIAN_WINDOW", "require")
        if n == 600:
            assert float(torch.ops.bmt_fast.median_bandwidth(x, "tiled")) == h
        else:
            with pytest.raises(RuntimeError, match="window missed"):
                torch.ops.bmt_fast.median_bandwidth(x, "tiled")


@requires_amx
# selection over stored distances, window; features in depth chunks of 512 (d >= 1024)
# (600 x 2100: the window's sample of few pairs read from the bf16 operands)
@pytest.mark.parametrize("n,d", [(300, 40), (513, 32), (1100, 65), (100, 1030), (600, 2100)])
def test_bf16_median_on_amx_is_that_of_the_rounded_particles(monkeypatch, n, d):
    """bf16 particles on an AMX CPU (d >= 32, n > 64): the median of the squared distances between the
    particles shifted exactly in bf16 (amx_shift: the operands of the step's distance tiles), i.e. of the
    particles themselves up to fp32 sums, which svgd_step's median rule uses too, bit for bit. (Centred by
    their fp32 mean and rounded to bf16, they had lost their own low bits: another median.) Columns centred
    (offset 50, spread 3), left as they are (offset 5), and both."""
    monkeypatch.setenv("BMT_FAST_MEDIAN_WINDOW", "require")
    torch.manual_seed(n)
    offsets = torch.where(torch.arange(d) % 2 == 0, 50.0, 5.0).double()
    x = (torch.randn(n, d, dtype=torch.float64) * 3 + offsets).bfloat16()
    h = torch.ops.bmt_fast.median_bandwidth(x, "tiled")
    shift = amx_shift(x)
    assert bool((shift[0, ::2] != 0).all()) and bool((shift[0, 1::2] == 0).any())  # (both kinds of column)
    rounded = (x.float() - shift).bfloat16()
    assert torch.equal(rounded.float() + shift, x.float())  # exact
    assert math.isclose(float(h), numpy_rule(x), rel_tol=1e-5)
    # svgd_step's median rule takes the same H (in double; median_bandwidth returns it in fp32)
    score = torch.randn(n, d).bfloat16()
    by_rule = torch.ops.bmt_fast.svgd_step(x, score, None, "tiled").double()
    given = torch.ops.bmt_fast.svgd_step(x, score, h.double(), "tiled").double()
    assert float((by_rule - given).abs().max() / given.abs().max()) <= 2.0**-7


@requires_cpu_extension
def test_two_identical_particles_and_one_apart():
    """n = 2 (the only n whose lower middle rank falls on a diagonal zero) with a zero and a positive distance."""
    for rows, median in (([[1.0, 2.0], [1.0, 2.0]], 0.0), ([[0.0, 0.0], [3.0, 4.0]], 12.5)):
        x = torch.tensor(rows, dtype=torch.float64)
        h = float(torch.ops.bmt_fast.median_bandwidth(x, "tiled"))
        assert math.isclose(h, max(median / math.log(3), reference.BANDWIDTH_FLOOR), rel_tol=1e-15)


@requires_cpu_extension
def test_sampled_estimate_within_a_few_percent_at_65536():
    """The documented error: on a Gaussian cloud of 65,536 particles the sampled H is within 2%."""
    x = torch.randn(65536, 4)
    exact = float(bmt_fast.median_bandwidth(x, backend="cpu"))
    generator = torch.Generator().manual_seed(1)
    sampled = [float(bmt_fast.median_bandwidth(x, method="sampled", generator=generator)) for _ in range(5)]
    errors = [abs(s / exact - 1) for s in sampled]
    assert max(errors) < 0.02, errors
    # Different draws differ (it really samples), and a fixed generator seed repeats a draw.
    assert len(set(sampled)) > 1
    again = bmt_fast.median_bandwidth(x, method="sampled", generator=torch.Generator().manual_seed(1))
    assert float(again) == sampled[0]


@pytest.mark.parametrize("d, constant", [(1, 2.33), (2, 1.44)])
def test_sampled_spread_is_the_documented_one(d, constant):
    """The documented standard deviation of the sampled H's relative error on a Gaussian cloud, constant /
    sqrt(num_pairs): 2.33 in one dimension (it had been documented as 1.45, the two-dimensional value), 1.44 in
    two. 60 draws of 4,096 pairs: the measured spread within 30% of it (the estimate's own spread ~9%)."""
    x = torch.randn(3000, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = float(bmt_fast.median_bandwidth(x, backend="torch"))
    generator = torch.Generator().manual_seed(2)
    errors = torch.tensor([
        float(bmt_fast.median_bandwidth(x, method="sampled", num_pairs=4096, generator=generator)) / exact - 1
        for _ in range(60)
    ])  # fmt: skip
    spread = float(errors.square().mean().sqrt())
    assert abs(spread / (constant / 4096**0.5) - 1) < 0.3, spread


def test_sampled_uses_num_pairs():
    x = torch.randn(300, 3, dtype=torch.float64)
    close = bmt_fast.median_bandwidth(x, method="sampled", num_pairs=80_000, generator=torch.Generator().manual_seed(0),
                                      backend="torch")  # (the CPU backend would return the exact median here)
    assert math.isclose(float(close), numpy_rule(x), rel_tol=0.02) and float(close) != numpy_rule(x)
    with pytest.raises(ValueError, match="num_pairs"):
        bmt_fast.median_bandwidth(x, method="sampled", num_pairs=0)


def test_sampled_with_no_more_pairs_than_samples_is_exact():
    x = torch.randn(300, 3, dtype=torch.float64)
    for num_pairs in (300 * 300, 200_000):
        h = bmt_fast.median_bandwidth(x, method="sampled", num_pairs=num_pairs, generator=torch.Generator().manual_seed(0))
        assert math.isclose(float(h), numpy_rule(x), rel_tol=1e-12)


def test_sampled_pairs_of_huge_particles_are_formed_a_block_at_a_time(monkeypatch):
    """The pair differences of num_pairs samples in blocks (soft prompts: 65,536 pairs x 409,600 values
    would be 107 GB); the blocks give the same distances as one batch."""
    x = torch.randn(20, 1000, dtype=torch.float64)
    draw = lambda: float(bmt_fast.median_bandwidth(x, method="sampled", num_pairs=301, backend="torch",  # noqa: E731
                                                   generator=torch.Generator().manual_seed(3)))
    whole = draw()
    monkeypatch.setattr(reference, "SAMPLE_BLOCK_VALUES", 7 * 1000)  # 7 pairs per block, a ragged last one
    assert draw() == whole


@requires_cpu_extension
def test_sampled_on_the_cpu_is_exact_where_that_costs_less():
    """On the CPU backend the exact median (cheaper there up to n * n <= 64 * num_pairs) replaces the
    samples; beyond, it samples."""
    x = torch.randn(100, 3, dtype=torch.float64)
    draw = lambda pairs: float(bmt_fast.median_bandwidth(x, method="sampled", num_pairs=pairs, backend="cpu",  # noqa: E731
                                                         generator=torch.Generator().manual_seed(2)))
    assert math.isclose(draw(157), numpy_rule(x), rel_tol=1e-12)  # 10,000 <= 64 * 157
    assert not math.isclose(draw(156), numpy_rule(x), rel_tol=1e-12)


def test_sampled_is_the_numpy_median_of_the_drawn_pairs():
    """The sampled rule: numpy.median of the squared distances of exactly the pairs the generator draws
    (i, then j), including i == j pairs; an even count, so both middle values matter."""
    x = torch.randn(500, 9, dtype=torch.float64)
    h = bmt_fast.median_bandwidth(x, method="sampled", num_pairs=4000, generator=torch.Generator().manual_seed(5),
                                  backend="torch")
    generator = torch.Generator().manual_seed(5)
    i = torch.randint(500, (4000,), generator=generator)
    j = torch.randint(500, (4000,), generator=generator)
    d2 = ((x[i] - x[j]) ** 2).sum(1).numpy()
    assert math.isclose(float(h), float(np.median(d2)) / math.log(501), rel_tol=1e-14)


@pytest.mark.parametrize("count", [1, 2, 3, 8, 9, 64, 65])
def test_reference_median_follows_numpy_with_ties(count):
    """numpy_median by selection (no sort): odd and even counts, repeated middle values."""
    generator = torch.Generator().manual_seed(count)
    for values in (torch.randn(count, generator=generator, dtype=torch.float64),
                   torch.randint(0, 4, (count,), generator=generator).double()):
        assert float(reference.numpy_median(values)) == float(np.median(values.numpy()))


def test_exact_at_65536_without_quadratic_memory():
    """Radix selection over streamed distance tiles: n=65536 completes (the n x n matrix would be 17 GB)."""
    if "cpu" not in bmt_fast.available_backends():
        pytest.skip("bmt_fast._C not built")
    x = torch.randn(65536, 2, dtype=torch.float64)
    h = float(bmt_fast.median_bandwidth(x))
    # Squared distances of a 2-D standard Gaussian cloud are 2 * Exp(1/2): median 4 ln 2 (diagonal
    # zeros shift the rank by 1/n, negligible here).
    assert math.isclose(h * math.log(65537), 4 * math.log(2), rel_tol=0.01)


# Shapes of every CPU path of the median ops: the Gram path (few particles; 16 x 409,600: the soft prompts of
# a 7B model), the fused distances by rows and by block pairs (600 x 16, 2100 x 8), GEMM tiles (600 x 300),
# the self kernel's tiles (1100 x 4100), feature chunks (300 x 3000); 16-bit particles off AMX go the fp32
# paths, bf16 ones take AMX on a CPU with it (65 x 64, 300 x 300).
CPU_PATH_CASES = """
import math, sys, torch, bmt_fast
torch.manual_seed(0)
failures = []
cases = [(3, 4, torch.float32), (16, 203, torch.float64), (16, 409_600, torch.float32), (40, 64, torch.bfloat16),
         (600, 16, torch.float32), (2100, 8, torch.float32), (600, 300, torch.float64), (600, 300, torch.float16),
         (1100, 4100, torch.float32), (300, 3000, torch.float32), (65, 64, torch.bfloat16),
         (300, 300, torch.bfloat16)]
"""
UNCHECKED_NAN_SCRIPT = CPU_PATH_CASES + """
for n, d, dtype in cases:
    x = torch.randn(n, d).to(dtype)
    assert math.isfinite(float(bmt_fast.median_bandwidth(x, backend="cpu", check_inputs=False)))
    for bad in (math.nan, math.inf, -math.inf):
        for i, k in {(0, 0), (n - 1, d - 1), (n // 2, d // 2)}:
            xb = x.clone()
            xb[i, k] = bad
            h = bmt_fast.median_bandwidth(xb, backend="cpu", check_inputs=False)
            kernel = bmt_fast.rbf_kernel(xb, backend="cpu", check_inputs=False)
            got = (float(h), bool(kernel.isnan().all()), kernel.dtype == dtype)
            if d * n <= 600 * 300:  # (the step's phi: every entry NaN, as H is)
                phi = bmt_fast.svgd_step(xb, torch.randn(n, d).to(dtype), backend="cpu", check_inputs=False)
                got += (bool(phi.isnan().all()),)
            if not (math.isnan(got[0]) and all(got[1:])):
                failures.append((n, d, str(dtype), bad, i, k, got))
torch.save(failures, sys.argv[1])
"""


@requires_cpu_extension
def test_unchecked_median_of_particles_with_nan_or_inf_is_nan_on_every_cpu_path(tmp_path):
    """With check_inputs=False (no scan of x) a NaN or an infinity in the particles, at the first particle (the
    Gram path's shift), the last value or the middle, makes H NaN, and rbf_kernel's K by the median rule and
    the step's phi all NaN, as the reference's; a clamp of NaN distances or a selection over NaN keys had
    given a finite, floored H on some paths and a 'bandwidth must be positive and finite' error on others.
    With the fused kernels and without (BMT_FAST_CPU_FUSED=0: GEMM tiles)."""
    results = run_cpu_variants(tmp_path, UNCHECKED_NAN_SCRIPT, {"fused": {}, "gemm": {"BMT_FAST_CPU_FUSED": "0"}})
    assert results == {"fused": [], "gemm": []}


# A NaN particle with a given bandwidth: its pairs' entries of K NaN (self: off the diagonal, row and column;
# against a second set of 7 or 900 rows, on either side: its row or column), and all of phi.
UNCHECKED_GIVEN_H_NAN_SCRIPT = CPU_PATH_CASES + """
for n, d, dtype in cases:
    h = torch.tensor(float(d))
    for i, k in {(0, 0), (n - 1, d - 1), (n // 2, d // 2)}:
        xb = torch.randn(n, d).to(dtype)
        xb[i, k] = math.nan
        kernel = bmt_fast.rbf_kernel(xb, xb, h, backend="cpu", check_inputs=False)
        off = torch.ones(n, dtype=torch.bool)
        off[i] = False
        got = (bool(kernel[i, off].isnan().all() and kernel[off, i].isnan().all()),)
        for m in (7, 900) if n * d <= 600 * 300 else (7,):
            y = torch.randn(m, d).to(dtype)
            cross = bmt_fast.rbf_kernel(xb, y, h, backend="cpu", check_inputs=False)
            back = bmt_fast.rbf_kernel(y, xb, h, backend="cpu", check_inputs=False)
            got += (bool(cross[i].isnan().all()), bool(back[:, i].isnan().all()))
        if n * d <= 600 * 300:
            phi = bmt_fast.svgd_step(xb, torch.randn(n, d).to(dtype), h, backend="cpu", check_inputs=False)
            got += (bool(phi.isnan().all()),)
        if not all(got):
            failures.append((n, d, str(dtype), i, k, got))
torch.save(failures, sys.argv[1])
"""


@requires_cpu_extension
def test_unchecked_nan_particle_with_given_bandwidth_gives_nan_on_every_cpu_path(tmp_path):
    """With check_inputs=False and a given H, a particle holding a NaN gives NaN entries of K for each of its
    pairs and an all-NaN phi (as the reference's), on every CPU path, with the fused kernels and without: the
    clamp of distances at 0 had turned its NaN distances into 0, K's entries into 1 and phi finite."""
    results = run_cpu_variants(tmp_path, UNCHECKED_GIVEN_H_NAN_SCRIPT, {"fused": {}, "gemm": {"BMT_FAST_CPU_FUSED": "0"}})
    assert results == {"fused": [], "gemm": []}


@requires_cpu_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_unchecked_particle_with_nan_gives_the_references_floor(dtype):
    """One particle holding a NaN: its only distance is the diagonal's exact 0, so the reference's median
    is 0 and H the floor; the CPU op gives the same (the GPU kernels give NaN: README)."""
    x = torch.randn(1, 7, dtype=dtype)
    x[0, 3] = math.nan
    expected = float(reference.median_bandwidth(x.double()))
    assert expected == reference.BANDWIDTH_FLOOR
    h = bmt_fast.median_bandwidth(x, backend="cpu", check_inputs=False)
    assert float(h) == float(torch.tensor(expected, dtype=dtype))  # (the floor in x's dtype)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_reference_and_sampled_medians_of_particles_with_nan_or_inf_are_nan(bad):
    """The reference's exact median (its centring spreads the value down a column), and the sampled one
    wherever a drawn pair holds the bad particle: NaN, as numpy.median of a NaN is (kthvalue alone ranks a
    NaN above every number and returned a finite median)."""
    x = torch.randn(3000, 5, dtype=torch.float64)
    x[7, 1] = bad
    assert math.isnan(float(reference.median_bandwidth(x)))
    sampled = bmt_fast.median_bandwidth(x, method="sampled", num_pairs=20_000, backend="torch", check_inputs=False,
                                        generator=torch.Generator().manual_seed(0))
    assert math.isnan(float(sampled))
    assert math.isnan(float(reference.numpy_median(torch.tensor([1.0, bad, 2.0]))))
    assert float(reference.numpy_median(torch.tensor([1.0, 3.0, 2.0]))) == 2.0
