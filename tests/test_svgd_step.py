"""svgd_step on every CPU backend and both algorithms against the float64 reference."""

import math

import pytest
import torch
from helpers import (COMPILED_CPU, amx_shift, assert_within, far_from_zero_bf16_particles, float32_matmul_precision,
                     relative_error, requires_amx, requires_cpu_extension, run_cpu_variants, subprocess_env,
                     torch_error_in)

import bmt_fast
from bmt_fast import reference

# (n, d): odd sizes, tile edges (the CPU tile is 512), both regimes.
SHAPES = [(1, 1), (2, 3), (3, 1), (7, 5), (12, 77), (17, 33), (64, 1), (65, 129), (127, 16), (513, 7), (1000, 64)]
HUGE_D = [(2, 100_003), (16, 65_536), (33, 20_000)]
ALGORITHMS = ["tiled", "gram"]


def reference_phi(x, score, h=None):
    return reference.svgd_step(x, score, None if h is None else torch.as_tensor(h, dtype=torch.float64))


def particles(n, d, offset=0.0, dtype=torch.float64):
    x = torch.randn(n, d, dtype=torch.float64) * 1.5 + offset
    score = torch.randn(n, d, dtype=torch.float64)
    return x.to(dtype), score.to(dtype)


@pytest.mark.parametrize("n,d", SHAPES + HUGE_D)
@pytest.mark.parametrize("bandwidth", ["median", 3.0])
def test_public_api_matches_reference_fp64(cpu_backend, n, d, bandwidth):
    x, score = particles(n, d)
    phi = bmt_fast.svgd_step(x, score, bandwidth, backend=cpu_backend)
    expected = reference_phi(x, score, None if bandwidth == "median" else bandwidth)
    assert phi.dtype == torch.float64 and phi.shape == x.shape
    assert relative_error(phi, expected) < 1e-12


@requires_cpu_extension
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("n,d", SHAPES + HUGE_D)
def test_both_cpu_algorithms_fp64(algorithm, n, d):
    x, score = particles(n, d)
    phi = torch.ops.bmt_fast.svgd_step(x, score, None, algorithm)
    assert relative_error(phi, reference_phi(x, score)) < 1e-12


FP32_CASES = [("tiled", n, d) for n, d in SHAPES + HUGE_D] + [
    ("gram", n, d) for n, d in SHAPES + HUGE_D if n <= 128  # the Gram path serves few particles
]


@requires_cpu_extension
@pytest.mark.parametrize("algorithm,n,d", FP32_CASES)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_both_cpu_algorithms_fp32(algorithm, n, d, offset):
    """fp32 within 2x the error of torch's own fp32 (floor: 32 ulps), also far from the origin."""
    x64, score64 = particles(n, d, offset)
    x64 = x64.float().double()  # the fp32 inputs, exactly, as the float64 reference input
    score64 = score64.float().double()
    h = torch.tensor(float(reference.median_bandwidth(x64)), dtype=torch.float64)
    phi = torch.ops.bmt_fast.svgd_step(x64.float(), score64.float(), h.float(), algorithm)
    assert phi.dtype == torch.float32

    def centred_reference(x, s):  # torch's error measured where it is fair: near the origin
        return reference.svgd_step(x - x64[:1].to(x.dtype), s, h.to(x.dtype))

    torch_error = torch_error_in(torch.float32, centred_reference, x64, score64)
    assert_within(phi, reference_phi(x64, score64, float(h)), torch_error)


@requires_cpu_extension
@pytest.mark.parametrize("n,d", [(5, 1000), (40, 515), (64, 77)])
@pytest.mark.parametrize("scale", [1.0, 2e4, 1e-6])
def test_fp16_gram_path_is_the_fp32_arithmetic_rounded_as_c10(n, d, scale):
    """fp16 particles on the Gram path widen exactly to fp32 and round phi back to fp16 a vector at a time
    (F16C in the AVX2 / AVX-512 builds): bit for bit the fp32 step on the widened inputs rounded by c10's
    conversion (torch's .half()), with the direct and the packed apply pass, ragged last vectors, values
    near the top of fp16's range (scale 2e4) and fp16 subnormals (scale 1e-6)."""
    torch.manual_seed(n + d)
    x = torch.randn(n, d).half()
    score = (torch.randn(n, d) * scale).clamp(-6e4, 6e4).half()
    h = torch.tensor(float(d), dtype=torch.float64)
    phi = torch.ops.bmt_fast.svgd_step(x, score, h, "gram")
    expected = torch.ops.bmt_fast.svgd_step(x.float(), score.float(), h, "gram").half()
    assert phi.dtype == torch.float16
    assert torch.equal(phi.view(torch.int16), expected.view(torch.int16))
    assert torch.isfinite(phi).all()
    if scale == 1e-6:
        assert ((phi != 0) & (phi.abs() < torch.finfo(torch.float16).tiny)).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", [(7, 5), (65, 129), (16, 65_536)])
def test_half_precision_accumulates_in_fp32(cpu_backend, dtype, n, d):
    x, score = particles(n, d, dtype=dtype)
    phi = bmt_fast.svgd_step(x, score, backend=cpu_backend)
    assert phi.dtype == dtype
    expected = reference_phi(x.double(), score.double())
    # 2 ulps of bf16 / fp16 at the result's scale: the final rounding to the half type (and, for bf16 with
    # many particles on an AMX CPU, the bf16 operands of its tensor-core path, test_bf16_on_amx_tiles).
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    assert relative_error(phi, expected) <= 2 * ulp


def test_event_shapes_are_flattened(cpu_backend):
    x = torch.randn(9, 4, 3, dtype=torch.float64)
    score = torch.randn(9, 4, 3, dtype=torch.float64)
    phi = bmt_fast.svgd_step(x, score, 2.0, backend=cpu_backend)
    assert phi.shape == (9, 4, 3)
    expected = reference_phi(x.reshape(9, 12), score.reshape(9, 12), 2.0).reshape(9, 4, 3)
    assert relative_error(phi, expected) < 1e-12


def test_non_contiguous_inputs(cpu_backend):
    base = torch.randn(40, 30, dtype=torch.float64)
    x = base.t()[::2]  # (15, 40), strided
    score = torch.randn(40, 15, dtype=torch.float64).t()
    assert not x.is_contiguous() and not score.is_contiguous()
    phi = bmt_fast.svgd_step(x, score, backend=cpu_backend)
    assert relative_error(phi, reference_phi(x.contiguous(), score.contiguous())) < 1e-12


@pytest.mark.parametrize("n, event", [(6, (2, 3)), (9, (40,)), (80, (3, 5))])  # Gram and tiled paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_out_receives_phi(cpu_backend, n, event, dtype):
    """out= is filled with the phi svgd_step returns, bit for bit, and is itself returned; it can be reused."""
    torch.manual_seed(n)
    out = torch.full((n, *event), 7.0, dtype=dtype)
    for step in range(2):
        x = torch.randn(n, *event, dtype=torch.float64).to(dtype)
        score = torch.randn(n, *event, dtype=torch.float64).to(dtype)
        for bandwidth, check in (("median", True), (0.7, True), (0.7, False)):
            result = bmt_fast.svgd_step(x, score, bandwidth, backend=cpu_backend, check_inputs=check, out=out)
            assert result is out
            torch.testing.assert_close(out, bmt_fast.svgd_step(x, score, bandwidth, backend=cpu_backend), rtol=0, atol=0)


@pytest.mark.parametrize("where", ["x", "score"])
def test_out_with_a_bad_input_still_names_it(cpu_backend, where):
    x, score = particles(5, 33, dtype=torch.float32)
    (x if where == "x" else score)[4, 32] = math.inf
    with pytest.raises(ValueError, match=f"{where} contains 1 NaN/Inf"):
        bmt_fast.svgd_step(x, score, backend=cpu_backend, out=torch.empty_like(x))


def test_single_particle_gives_its_score(cpu_backend):
    x, score = particles(1, 10)
    for bandwidth in ("median", 0.5):
        torch.testing.assert_close(bmt_fast.svgd_step(x, score, bandwidth, backend=cpu_backend), score)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d", [(6, 5), (16, 3000), (150, 300), (40, 600)])  # fused, Gram, feature chunks
def test_identical_particles_give_the_mean_score(cpu_backend, dtype, n, d):
    """K = 1 and no repulsion (H at its floor, 2/H = 2e12): the feature chunks' fp32 column mean of 150
    copies of a row was not the row, and that residue times 2/H had made phi 14x too large."""
    x = (torch.randn(1, d, dtype=torch.float64) * 3 + 1).expand(n, d).to(dtype).contiguous()
    score = torch.randn(n, d, dtype=dtype)
    assert math.isclose(float(bmt_fast.median_bandwidth(x, backend=cpu_backend)), bmt_fast.BANDWIDTH_FLOOR, rel_tol=1e-6)
    phi = bmt_fast.svgd_step(x, score, backend=cpu_backend)
    assert torch.isfinite(phi).all()
    torch.testing.assert_close(phi, score.double().mean(0, keepdim=True).expand_as(score).to(dtype))


@pytest.mark.parametrize("outlier_row", [0, 15])
def test_a_particle_far_from_a_tight_group_in_any_row(cpu_backend, outlier_row):
    """16 particles of 1000 features (the Gram path), 15 within 1e-3 of each other and one ~3 away. The Gram
    pass shifts the rows by particle 0: with the outlier there, fp32 cancellation had made K wrong by 0.95,
    the median 20 % off and phi by 3.5x its size (row 15: 3e-5). Now as good in either row as torch's fp32."""
    torch.manual_seed(7)
    n, d = 16, 1000
    x = torch.randn(1, d, dtype=torch.float64) + 1e-3 * torch.randn(n, d, dtype=torch.float64) / d**0.5
    x[0] += 3 * torch.randn(d, dtype=torch.float64) / d**0.5
    order = torch.arange(n) if outlier_row == 0 else torch.roll(torch.arange(n), -1)
    x, score = x[order], torch.randn(n, d, dtype=torch.float64)
    h = reference.median_bandwidth(x)
    xf, sf = x.float(), score.float()

    def within_torch_fp32(ours, torch_fp32, expected, floor):  # the GUIDE's rule: at most 2x torch's own error
        assert relative_error(ours, expected) <= max(2 * relative_error(torch_fp32, expected), floor)

    within_torch_fp32(bmt_fast.median_bandwidth(xf, backend=cpu_backend), reference.median_bandwidth(xf), h, 1e-4)
    within_torch_fp32(bmt_fast.rbf_kernel(xf, None, h, backend=cpu_backend), reference.rbf_kernel(xf, None, h.float()),
                      reference.rbf_kernel(x, None, h), 1e-4)  # fmt: skip
    within_torch_fp32(bmt_fast.svgd_step(xf, sf, backend=cpu_backend), reference.svgd_step(xf, sf, None),
                      reference.svgd_step(x, score, None), 1e-5)  # fmt: skip


def test_mostly_identical_particles_stay_finite(cpu_backend):
    x = torch.zeros(9, 3, dtype=torch.float64)
    x[7:] = torch.randn(2, 3, dtype=torch.float64)  # 49 of 81 pairs coincide: median 0, H at the floor
    phi = bmt_fast.svgd_step(x, torch.randn(9, 3, dtype=torch.float64), backend=cpu_backend)
    assert torch.isfinite(phi).all()


@pytest.mark.parametrize("grad_of", ["x", "score", "both"])
def test_result_has_no_autograd_history(cpu_backend, grad_of):
    x = torch.randn(8, 3, requires_grad=grad_of in ("x", "both"))
    score = torch.randn(8, 3, requires_grad=grad_of in ("score", "both"))
    for out in (None, torch.empty(8, 3)):
        phi = bmt_fast.svgd_step(x, score, backend=cpu_backend, out=out)
        assert not phi.requires_grad and phi.grad_fn is None


def test_result_has_no_forward_mode_tangent(cpu_backend):
    """no_grad leaves forward-mode AD on: the reference backend's torch ops had given phi and the median a
    tangent (a dual x outside torch.func), where the compiled kernels give none."""
    import torch.autograd.forward_ad as fwAD

    x, tangent = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, tangent)
        results = [bmt_fast.svgd_step(dual, -dual, 0.7, backend=cpu_backend),
                   bmt_fast.svgd_step(dual, -dual, backend=cpu_backend, out=torch.empty(6, 3, dtype=torch.float64)),
                   bmt_fast.median_bandwidth(dual, backend=cpu_backend)]  # fmt: skip
        for result in results:
            assert fwAD.unpack_dual(result).tangent is None
    torch.testing.assert_close(results[0], bmt_fast.svgd_step(x, -x, 0.7, backend=cpu_backend))


@pytest.mark.parametrize("n", [4, 70])  # the Gram path and the fused kernel
def test_out_write_is_seen_by_autograd(cpu_backend, n):
    """Writing phi into out bumps out's version counter: autograd refuses a backward that saved out's old
    values (as for any in-place op), instead of silently using phi."""
    buf = torch.ones(n, 3)
    w = torch.ones(n, 3, requires_grad=True)
    y = (buf * w).sum()  # saves buf for the gradient in w
    version = buf._version
    bmt_fast.svgd_step(torch.randn(n, 3), torch.randn(n, 3), backend=cpu_backend, out=buf)
    assert buf._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_out_that_requires_grad_is_refused(cpu_backend):
    """As torch's out= functions: phi has no autograd history, so an out that autograd tracks is refused
    (and left as it was); under no_grad it is written."""
    x, score = torch.randn(4, 3), torch.randn(4, 3)
    out = torch.zeros(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match="out must not require grad"):
        bmt_fast.svgd_step(x, score, backend=cpu_backend, out=out)
    assert not out.detach().any()
    with torch.no_grad():
        bmt_fast.svgd_step(x, score, backend=cpu_backend, out=out)
    torch.testing.assert_close(out.detach(), bmt_fast.svgd_step(x, score, backend=cpu_backend))


@requires_cpu_extension
def test_raw_ops_are_not_differentiable():
    """torch.ops.bmt_fast.svgd_step / median_bandwidth / svgd_step_into run below autograd: results without
    history (as torch.argmax), out's version bumped, an out that autograd tracks refused, also in
    inference mode on a normal tensor."""
    x = torch.randn(4, 3, requires_grad=True)
    score = torch.randn(4, 3)
    for result in (torch.ops.bmt_fast.svgd_step(x, score, None), torch.ops.bmt_fast.median_bandwidth(x)):
        assert not result.requires_grad and result.grad_fn is None
    out = torch.empty(4, 3)
    torch.ops.bmt_fast.svgd_step_into(x, score, None, out=out)
    assert out._version == 1
    with torch.inference_mode():
        torch.ops.bmt_fast.svgd_step_into(x.detach(), score, None, out=out)
    assert out._version == 2
    with pytest.raises(RuntimeError, match="out must not require grad"):
        torch.ops.bmt_fast.svgd_step_into(x, score, None, out=torch.empty(4, 3, requires_grad=True))
    xs, scores = x.detach().expand(2, 4, 3), score.expand(2, 4, 3)
    torch.ops.bmt_fast.svgd_step_batched_into(xs, scores, None, out=(outs := torch.empty(2, 4, 3)))
    assert outs._version == 1
    with pytest.raises(RuntimeError, match="svgd_step_batched_into: out must not require grad"):
        torch.ops.bmt_fast.svgd_step_batched_into(xs, scores, None, out=torch.empty(2, 4, 3, requires_grad=True))


FIRST_CALL_SCRIPT = """
import sys, torch
torch.set_num_threads(2)
ops = torch.ops.bmt_fast
import bmt_fast
results = {}
for n, d, dtype in ((80, 300, torch.float32), (31, 200, torch.float64), (100, 40, torch.float32)):
    torch.manual_seed(n + d)
    x, score = torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)
    h = torch.tensor(float(d), dtype=torch.float64)
    calls = [(ops.svgd_step(x, score, h, "tiled"), ops.svgd_step(x, score, None, "tiled"), ops.rbf_kernel(x, x, h))
             for _ in range(3)]
    results[(n, d)] = [all(torch.equal(a, b) for a, b in zip(calls[0], later)) for later in calls[1:]]
torch.save(results, sys.argv[1])
"""


@requires_cpu_extension
def test_first_call_in_a_process_is_the_later_calls_bit_for_bit(tmp_path):
    """Small calls run on one thread (SerialIfSmall), the first call on a thread too: ATen's once-per-thread
    setup of the OpenMP thread count (on the first parallel loop) had put it back to torch's, so the first call
    of a process ran threaded and, where a path splits its work by the thread count (the feature chunks), gave
    results an ulp apart from every later call's."""
    results = run_cpu_variants(tmp_path, FIRST_CALL_SCRIPT, {"fused": {}, "gemm": {"BMT_FAST_CPU_FUSED": "0"}})
    for variant, cases in results.items():
        for case, same in cases.items():
            assert all(same), (variant, case, same)


@requires_cpu_extension
def test_svgd_step_batched_into_op():
    """torch.ops.bmt_fast.svgd_step_batched_into: each set's phi and flag as svgd_step_into's on it; its
    schema, Meta kernel and CPU kernel agree (opcheck); bad arguments are named."""
    ops = torch.ops.bmt_fast
    x, score = torch.randn(5, 7, 3), torch.randn(5, 7, 3)
    h = torch.rand(5, dtype=torch.float64) + 0.5
    score[3, 0, 0] = float("nan")
    for bandwidth in (None, h):
        out = torch.empty_like(x)
        flags = ops.svgd_step_batched_into(x, score, bandwidth, "auto", out=out)
        assert flags.dtype == torch.bool and flags.tolist() == [True, True, True, False, True]
        for i in range(5):
            single = torch.empty(7, 3)
            ops.svgd_step_into(x[i], score[i], None if bandwidth is None else bandwidth[i], "auto", out=single)
            torch.testing.assert_close(out[i], single, rtol=0, atol=0, equal_nan=True)
    # the kernel of devices without their own (CUDA): svgd_step_into on each set through the dispatcher, reached
    # here through a dispatch key that has no kernel of its own either
    elsewhere = torch._C.DispatchKeySet(torch._C.DispatchKey.PrivateUse1)
    for bandwidth in (None, h):
        out, composite = torch.empty_like(x), torch.empty_like(x)
        flags = ops.svgd_step_batched_into.default.redispatch(elsewhere, x, score, bandwidth, "auto", out=composite)
        assert flags.tolist() == ops.svgd_step_batched_into(x, score, bandwidth, "auto", out=out).tolist()
        torch.testing.assert_close(composite, out, rtol=0, atol=0, equal_nan=True)
    score[3, 0, 0] = 0.0
    torch.library.opcheck(ops.svgd_step_batched_into.default, (x, score, h, "auto"), {"out": torch.empty_like(x)})
    torch.library.opcheck(ops.svgd_step_batched_into.default, (x, score, None, "gram"), {"out": torch.empty_like(x)})
    meta = ops.svgd_step_batched_into(x.to("meta"), score.to("meta"), h.to("meta"), out=torch.empty_like(x, device="meta"))
    assert meta.shape == (5,) and meta.dtype == torch.bool
    out = torch.empty_like(x)
    for args, message in (
        ((x[0], score[0], None), "x must be 3-D"),
        ((x, score[:, :6], None), "score must have the shape of x"),
        ((x, score.double(), None), "score must have the dtype of x"),
        ((x, score, h[:4]), r"bandwidth must have shape \(5,\)"),
        ((x, score, h.reshape(5, 1)), r"bandwidth must have shape \(5,\)"),
        ((x, score, torch.ones(5, dtype=torch.int64)), "bandwidth must be floating point"),
        ((x, score, -h), "bandwidth must be positive and finite"),
        ((x[:, :0], score[:, :0], None), "x must not be empty"),
    ):
        with pytest.raises(RuntimeError, match=message):
            ops.svgd_step_batched_into(*args, out=out if args[0].shape == x.shape else torch.empty_like(args[0]))
    # a bad bandwidth of a later set is refused before any set is stepped: out keeps what it held
    late = h.clone()
    late[4] = 0.0
    out.fill_(7.0)
    with pytest.raises(RuntimeError, match="bandwidth must be positive and finite, got 0"):
        ops.svgd_step_batched_into(x, score, late, out=out)
    assert bool((out == 7.0).all())
    for bad_out, message in ((torch.empty(5, 7, 4), "out must have the shape of x"), (x, "out must not overlap x"),
                             (torch.empty(5, 3, 7).mT, "out must be contiguous")):
        with pytest.raises(RuntimeError, match=message):
            ops.svgd_step_batched_into(x, score, None, out=bad_out)
    with pytest.raises(RuntimeError, match="algorithm must be"):
        ops.svgd_step_batched_into(x, score, None, "fast", out=out)


def test_moves_particles_to_a_gaussian(cpu_backend):
    """Particles started in a corner spread to N(mu, sigma^2): SVGD matches mean and variance."""
    mu, sigma = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5
    x = torch.randn(200, 2, dtype=torch.float64) * 0.1 + 5.0
    for _ in range(800):
        score = -(x - mu) / sigma**2
        x = x + 0.05 * bmt_fast.svgd_step(x, score, backend=cpu_backend)
    # Mean within a fifth of sigma, standard deviation within 30% (a sign error in either term of phi
    # leaves the particles near the start or collapses them to a point).
    torch.testing.assert_close(x.mean(0), mu, atol=0.1, rtol=0)
    assert ((x.std(0) - sigma).abs() < 0.3 * sigma).all(), x.std(0)


@requires_cpu_extension
def test_auto_uses_the_compiled_kernel_on_cpu():
    assert bmt_fast.backends.select("auto", "svgd_step", torch.randn(4, 3)).name == "cpu"


@requires_cpu_extension
def test_backend_choice_is_remembered_until_a_rule_changes():
    """select() looks a choice up once per (name, op, device type, n, d, dtype); a new auto rule or backend
    takes effect at once, and an explicit name is still checked on every call."""
    x = torch.randn(5, 2, 3)
    select = bmt_fast.backends.select
    cpu = bmt_fast.backends.get("cpu")
    assert select("auto", "svgd_step", x) is select("auto", "svgd_step", x.reshape(5, 6)) is cpu
    original = bmt_fast.backends._AUTO_RULES["cpu"]
    bmt_fast.backends.set_auto_rule("cpu", lambda op, n, d, dtype: ["torch"] if d == 6 else ["cpu"])
    try:
        assert select("auto", "svgd_step", x).name == "torch"
        assert select("auto", "svgd_step", torch.randn(5, 7)).name == "cpu"
        phi = bmt_fast.svgd_step(x, torch.randn_like(x))  # the public op follows the new rule
        assert phi.shape == x.shape
    finally:
        bmt_fast.backends.set_auto_rule("cpu", original)
    assert select("auto", "svgd_step", x).name == "cpu"
    for _ in range(2):
        with pytest.raises(ValueError, match="unknown backend"):
            select("nope", "svgd_step", x)
        with pytest.raises(TypeError, match="backend must be a string"):
            select(None, "svgd_step", x)


@pytest.mark.parametrize("n", [4, 13, 64, 100])  # the CPU Gram path up to 16 particles here, the fused kernel beyond
@pytest.mark.parametrize("h", [1e-2, 1e-4, 1e-6])
def test_float32_with_a_tiny_bandwidth(cpu_backend, n, h):
    """A fixed H far below the squared distances (particles that barely interact: phi is about score / n).
    Folded into w_i = score_i - (2/H) x_i, a particle's own term k_ii = 1 was w_i + (2/H) x_i, whose two
    large terms cancel: the CPU kernels' fp32 error was 0.6 at H = 1e-6 (4 particles at spread 10), the
    reference's 0. They now add score_i / n itself."""
    x, score = torch.randn(n, 24) * 10, torch.randn(n, 24)
    hb = torch.tensor(h, dtype=torch.float64)
    expected = reference.svgd_step(x.double(), score.double(), hb)
    assert relative_error(bmt_fast.svgd_step(x, score, h, backend=cpu_backend), expected) < 1e-6


AMX_FOLDED_MAX_SPREAD = 8.0  # (csrc/cpu/amx.cpp: kAmxFoldedMaxSpread)


def amx_phi(k0, x, score, h):
    """The AMX step's arithmetic (csrc/cpu/amx.cpp, amx_step_splits) in float64 from its K (fp32 values, own
    terms 0) with Xs = x - amx_shift(x) in fp32 (exact for bf16 particles): folded where every |Xs| <= 8
    sqrt(H), K and W = score - (2/H) Xs rounded to bf16 for K W and K's fp32 row sums; split beyond, K,
    score and Xs rounded to bf16 for K [S | Xs] and the row sums of the rounded K."""
    n, a = x.shape[0], 2.0 / h
    xs = (x.float() - amx_shift(x)).double()
    kr, s = k0.float().bfloat16().double(), score.double()
    if float(xs.abs().max()) > AMX_FOLDED_MAX_SPREAD * math.sqrt(h):
        xr = xs.float().bfloat16().double()
        sr = s.float().bfloat16().double()
        return (kr @ sr + a * (kr.sum(1, keepdim=True) * xr - kr @ xr) + s) / n
    w = (s - a * xs).float().bfloat16().double()
    return (kr @ w + a * k0.sum(1, keepdim=True) * xs + s) / n


def amx_precision_phi(x, score, h):
    """The AMX path's arithmetic in torch: particles shifted by amx_shift (bf16 ones exactly) and rounded to
    bf16 for the distances, K in fp32 (its own term 0), then amx_phi."""
    xb = (x.float() - amx_shift(x)).bfloat16().float()
    norms = (xb * xb).sum(1)
    k = torch.exp(-(norms[:, None] + norms[None] - 2 * xb @ xb.T).clamp_min(0) / h).fill_diagonal_(0)
    return amx_phi(k.double(), x, score, h).bfloat16()


@requires_amx
@pytest.mark.parametrize("n,d", [(65, 32), (100, 33), (257, 64), (300, 129), (513, 40), (129, 1024), (70, 20001), (600, 2050)])
@pytest.mark.parametrize("bandwidth", ["median", 3.0, 1e-6])
def test_bf16_on_amx_tiles(n, d, bandwidth):
    """bf16 particles with many particles on an AMX CPU: the tensor-core precision of the GPU kernels
    (bf16 operands, fp32 sums), within 2 ulps of bf16 of the float64 reference, and the arithmetic the
    path documents (torch emulation of it: with a given H every entry equal up to a last-bit flip in the
    final rounding, bit for bit on these inputs when written; with the median rule, whose H the emulation
    takes from median_bandwidth in fp32, within an ulp of the largest entry). Ragged
    blocks (128 rows, 256 columns, 32 features), the median rule, and a tiny H (the own term k_ii = 1)."""
    torch.manual_seed(n + d)
    x, score = particles(n, d, dtype=torch.bfloat16)
    if bandwidth == 1e-6:
        x = (x.double() * 7).bfloat16()
    h = None if bandwidth == "median" else torch.tensor(bandwidth, dtype=torch.float64)
    phi = torch.ops.bmt_fast.svgd_step(x, score, h, "tiled")
    expected = reference_phi(x.double(), score.double(), h)
    assert phi.dtype == torch.bfloat16
    assert relative_error(phi, expected) <= 2 * 2.0**-8
    if h is None:  # the median of the rounded particles, as median_bandwidth gives it (rounded to fp32)
        emulated = amx_precision_phi(x, score, float(torch.ops.bmt_fast.median_bandwidth(x, "tiled")))
        assert relative_error(phi, emulated) <= 2.0**-7
    else:  # every entry, up to a last-bit flip of bf16
        emulated = amx_precision_phi(x, score, bandwidth).float()
        tolerance = 2.0**-7 * torch.maximum(phi.float().abs(), emulated.abs())
        assert ((phi.float() - emulated).abs() <= tolerance).all()


@requires_amx
@pytest.mark.parametrize("n,d", [(65, 4097), (100, 600), (257, 5300), (500, 16400)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_few_particles_on_amx_by_feature_chunks(n, d, dtype):
    """Up to 512 particles with many features (from 512 features up to 128 particles, else from n_pad^2 / 16)
    take the AMX step by feature chunks: the threads share chunks of 128 features (the last ones ragged
    here) in parts, each summing its chunks' dot products. median_bandwidth, rbf_kernel and rbf_kernel_median take
    the same Gram pass there, so K is rbf_kernel's bit for bit and phi is the documented arithmetic with
    it (amx_phi; fp32 to fp32 rounding, fp32 under "medium"; bf16 within an ulp of its largest entry, whose K
    the emulation reads rounded). Within 2 bf16 ulps of the float64 reference; a NaN in either input is an error. (The
    particles share a few directions: the dot products, not only the norms, set their distances.)"""
    torch.manual_seed(n + d)
    x, score = particles(n, d, offset=2.0, dtype=torch.float64)
    x = (x + torch.randn(n, 3, dtype=torch.float64) @ torch.randn(3, d, dtype=torch.float64)).to(dtype)
    score = score.to(dtype)
    with float32_matmul_precision("medium"):
        phi = torch.ops.bmt_fast.svgd_step(x, score, None, "tiled")
        h = torch.ops.bmt_fast.median_bandwidth(x, "tiled")
        k = torch.ops.bmt_fast.rbf_kernel(x, x, h)
        k_median, h_median = torch.ops.bmt_fast.rbf_kernel_median(x)
        given = torch.ops.bmt_fast.svgd_step(x, score, h.double(), "tiled")
        for name in ("x", "score"):
            bad = (x if name == "x" else score).clone()
            bad[n // 2, d - 3] = float("nan")
            args = (bad, score) if name == "x" else (x, bad)
            with pytest.raises(ValueError, match=f"^{name} contains 1 NaN/Inf value"):
                bmt_fast.svgd_step(*args, "median", backend="cpu")
    assert torch.equal(h_median, h) and torch.equal(k_median, k) and torch.equal(k, k.T)
    assert torch.equal(k.diagonal(), torch.ones(n, dtype=dtype))
    assert relative_error(k, reference.rbf_kernel(x.double(), x.double(), h.double())) <= 2 * 2.0**-8
    assert phi.dtype == dtype and relative_error(phi, reference_phi(x.double(), score.double())) <= 2 * 2.0**-8
    emulated = amx_phi(k.double().fill_diagonal_(0), x, score, float(h))
    assert relative_error(given, emulated) <= (1e-5 if dtype == torch.float32 else 2.0**-7)
    assert relative_error(phi, given) <= (1e-5 if dtype == torch.float32 else 2.0**-7)


@requires_amx
@pytest.mark.parametrize("n,d", [(256, 64), (1000, 128), (600, 2050), (100, 4097)])
def test_bf16_step_of_tight_clusters_far_apart_on_amx(n, d):
    """Two clusters 0.05 wide whose centres are drawn N(0, 10^2) per feature, H from the distances within a
    cluster: the particles' spread is far beyond the kernel's width, so the AMX step multiplies K by score
    and the shifted particles apart (K [S | Xs], amx_phi's split form). Folded into W = score - (2/H) Xs, the
    bf16 rounding of (2/H) Xs had put phi 4.8e-2 off at 256 x 64 (within 2 bf16 ulps now, as on Gaussian
    clouds). Blocks of rows, the chunked products of many features (600 x 2050) and the few-particle
    chunks (100 x 4097); Gaussian particles of the same spread stay folded (amx_phi)."""
    torch.manual_seed(n + d)
    centres = torch.randn(2, d, dtype=torch.float64) * 10
    x = (centres[torch.arange(n) % 2] + 0.05 * torch.randn(n, d, dtype=torch.float64)).bfloat16()
    score = torch.randn(n, d).bfloat16()
    same = x[0::2].double()
    h = float(torch.cdist(same, same).square().median())
    hb = torch.tensor(h, dtype=torch.float64)
    phi = torch.ops.bmt_fast.svgd_step(x, score, hb, "tiled")
    assert relative_error(phi, reference_phi(x.double(), score.double(), hb)) <= 2 * 2.0**-8
    k0 = torch.ops.bmt_fast.rbf_kernel(x, x, hb).double().fill_diagonal_(0)
    assert float((x.float() - amx_shift(x)).abs().max()) > AMX_FOLDED_MAX_SPREAD * math.sqrt(h)  # (split)
    assert relative_error(phi, amx_phi(k0, x, score, h)) <= 2.0**-7


@requires_amx
@pytest.mark.parametrize("case", ["outlier", "range"])
def test_bf16_particles_without_a_well_conditioned_exact_shift_on_amx(case):
    """Columns with no exact bf16 shift that keeps the expansion well conditioned take the mean, as before the
    exact shifts (helpers.far_from_zero_bf16_particles): a shift of 0 there had left K 0.1 off (outlier) and
    K, the median and phi NaN (range) on the AMX path; now within bf16's rounding, as with AMX off."""
    x = far_from_zero_bf16_particles()[case]
    score = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    h = reference.median_bandwidth(x.double())
    k = torch.ops.bmt_fast.rbf_kernel(x, x, h)
    assert relative_error(k, reference.rbf_kernel(x.double(), x.double(), h)) <= 2 * 2.0**-8
    median = torch.ops.bmt_fast.median_bandwidth(x, "auto")
    assert abs(float(median) / float(h) - 1) <= 2e-3
    phi = torch.ops.bmt_fast.svgd_step(x, score, None, "auto")
    assert relative_error(phi, reference_phi(x.double(), score.double())) <= 2 * 2.0**-8


@requires_cpu_extension
@pytest.mark.parametrize(
    "n,d", [(400, 1700), (180, 600), (257, 1300), (200, 300), (500, 200), (130, 70), (600, 2450)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_few_particles_on_the_gemm_path_by_feature_chunks(n, d, dtype):
    """fp32 (IEEE) and fp64 particles beyond the Gram path, up to 512 of them with more than 256 features (64 or more
    with BMT_FAST_CPU_FUSED=0, as the tests' last pass runs: 500 x 200 and 130 x 70 take the fused kernels
    otherwise; up to 1024 with 4 or more features per particle: 600 x 2450), go by feature chunks, in one team
    (team.h): the threads share chunks of up to 512 features (fewer where that balances them; ragged last chunks
    here), each centred by its own column means, their dot products summed per thread; with fewer chunks than
    threads (200 x 300, and 500 x 200 and 130 x 70 with the fused kernels off) each chunk's columns, then its
    blocks of rows, are shared instead; and the step applies K a chunk (and a share of rows) at a time. median_bandwidth, rbf_kernel(x) and
    rbf_kernel_median take that one pass, so K is rbf_kernel's bit for bit, symmetric, with a diagonal of ones, and
    phi by the median rule is phi with that H given (to H's fp32 rounding). The particles sit around 1e4 (each
    chunk's means cancel the offset) and share a few directions; everything within fp32 (fp64) rounding of the
    float64 reference, also on one thread (one part). phi into out= with its finiteness flag; a phi that overflows
    is flagged and returned as computed."""
    torch.manual_seed(n + d)
    x, score = particles(n, d, offset=1e4, dtype=torch.float64)
    x = (x + torch.randn(n, 3, dtype=torch.float64) @ torch.randn(3, d, dtype=torch.float64)).to(dtype)
    score = score.to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    h = torch.ops.bmt_fast.median_bandwidth(x, "auto")
    k = torch.ops.bmt_fast.rbf_kernel(x, x, h)
    k_median, h_median = torch.ops.bmt_fast.rbf_kernel_median(x)
    assert torch.equal(h_median, h) and torch.equal(k_median, k) and torch.equal(k, k.T)
    assert torch.equal(k.diagonal(), torch.ones(n, dtype=dtype))
    x64 = x.double()
    assert abs(float(h) / float(reference.median_bandwidth(x64)) - 1) <= tol
    assert relative_error(k, reference.rbf_kernel(x64, x64, h.double())) <= tol
    out = torch.empty_like(x)
    finite = torch.ops.bmt_fast.svgd_step_into(x, score, None, "auto", out=out)
    phi = torch.ops.bmt_fast.svgd_step(x, score, None, "tiled")
    given = torch.ops.bmt_fast.svgd_step(x, score, h.double(), "auto")
    assert bool(finite) and torch.equal(out, phi) and phi.dtype == dtype
    assert relative_error(phi, reference_phi(x64, score.double())) <= tol
    assert relative_error(given, reference_phi(x64, score.double(), h.double())) <= tol
    assert torch.equal(phi, given) if dtype == torch.float64 else relative_error(phi, given) <= tol
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.bmt_fast.svgd_step(x, score, h.double(), "auto")
        k_one = torch.ops.bmt_fast.rbf_kernel(x, x, h)
    finally:
        torch.set_num_threads(threads)
    assert relative_error(one, given) <= tol and relative_error(k_one, k) <= tol
    big, wide = torch.full_like(score, torch.finfo(dtype).max / 4), torch.tensor(1e30, dtype=torch.float64)
    assert not bool(torch.ops.bmt_fast.svgd_step_into(x, big, wide, "auto", out=out))  # (every K = 1)
    assert torch.isinf(out).all() and torch.equal(out, bmt_fast.svgd_step(x, big, wide, backend="cpu"))


@requires_amx
@pytest.mark.parametrize("n,d,path", [(33, 512, "tiled"), (64, 700, "tiled"), (32, 4096, "gram"), (64, 500, "gram")])
def test_auto_takes_the_amx_chunks_from_33_bf16_particles_with_many_features(n, d, path):
    """"auto" keeps the Gram path (fp32 arithmetic) up to 64 particles, except bf16 particles with 512 or more
    features, which take the AMX feature-chunk path from 33 particles (faster there): phi and the median as
    the algorithm `path` gives them, and not as the other one; rbf_kernel_median and rbf_kernel follow the
    same rule (the median's K is rbf_kernel's with that median, bit for bit)."""
    torch.manual_seed(n + d)
    x, score = particles(n, d, dtype=torch.bfloat16)
    h = torch.tensor(2.0 * d, dtype=torch.float64)
    other = "gram" if path == "tiled" else "tiled"
    auto = torch.ops.bmt_fast.svgd_step(x, score, h, "auto")
    assert torch.equal(auto, torch.ops.bmt_fast.svgd_step(x, score, h, path))
    assert not torch.equal(auto, torch.ops.bmt_fast.svgd_step(x, score, h, other))
    median = torch.ops.bmt_fast.median_bandwidth(x, "auto")
    assert torch.equal(median, torch.ops.bmt_fast.median_bandwidth(x, path))
    k, k_median = torch.ops.bmt_fast.rbf_kernel_median(x)
    assert torch.equal(k_median, median) and torch.equal(k, torch.ops.bmt_fast.rbf_kernel(x, x, median))


# Shapes on either side of the CPU's Gram-path rules (csrc/cpu/gram.cpp, gram_rule): the Gram path for
# n <= `always` particles or where n^power <= per_feature * d, up to 512 particles. svgd_step with H given:
# fp32 (and 16-bit) n <= 16 or n^2 <= 16 d, fp64 n <= 16 or n^2 <= 48 d; median_bandwidth and svgd_step with
# the median rule: fp32 n <= 32 or n^3 <= 4096 d, fp64 n <= 48 or n^3 <= 8192 d; rbf_kernel(x): fp32 n^2 <= 8 d,
# fp64 n^2 <= 24 d.
GRAM_RULE_CASES = [
    ("svgd_step", torch.float32, 16, 8, "gram"), ("svgd_step", torch.float32, 17, 19, "gram"),
    ("svgd_step", torch.float32, 17, 18, "tiled"), ("svgd_step", torch.float32, 64, 256, "gram"),
    ("svgd_step", torch.float32, 64, 255, "tiled"), ("svgd_step", torch.float32, 192, 2304, "gram"),
    ("svgd_step", torch.float32, 192, 2303, "tiled"), ("svgd_step", torch.float32, 257, 4129, "gram"),
    ("svgd_step", torch.float32, 257, 4128, "tiled"), ("svgd_step", torch.float32, 513, 20000, "tiled"),
    ("svgd_step", torch.float64, 64, 86, "gram"), ("svgd_step", torch.float64, 64, 85, "tiled"),
    ("svgd_step", torch.float64, 192, 768, "gram"), ("svgd_step", torch.float64, 192, 767, "tiled"),
    ("svgd_step", torch.float64, 256, 1366, "gram"), ("svgd_step", torch.float64, 256, 1365, "tiled"),
    ("median_bandwidth", torch.float32, 32, 8, "gram"), ("median_bandwidth", torch.float32, 33, 9, "gram"),
    ("median_bandwidth", torch.float32, 33, 8, "tiled"), ("median_bandwidth", torch.float32, 64, 64, "gram"),
    ("median_bandwidth", torch.float32, 64, 63, "tiled"), ("median_bandwidth", torch.float32, 192, 1728, "gram"),
    ("median_bandwidth", torch.float32, 192, 1727, "tiled"), ("median_bandwidth", torch.float64, 48, 8, "gram"),
    ("median_bandwidth", torch.float64, 64, 32, "gram"), ("median_bandwidth", torch.float64, 64, 31, "tiled"),
    ("median_bandwidth", torch.float64, 100, 123, "gram"), ("median_bandwidth", torch.float64, 100, 122, "tiled"),
    ("rbf_kernel", torch.float32, 16, 32, "gram"), ("rbf_kernel", torch.float32, 16, 31, "tiled"),
    ("rbf_kernel", torch.float32, 64, 512, "gram"), ("rbf_kernel", torch.float32, 64, 511, "tiled"),
    ("rbf_kernel", torch.float32, 64, 63, "tiled"), ("rbf_kernel", torch.float64, 64, 171, "gram"),
    ("rbf_kernel", torch.float64, 64, 170, "tiled"), ("rbf_kernel", torch.float64, 64, 20, "tiled"),
    ("rbf_kernel", torch.float64, 300, 3750, "gram"), ("rbf_kernel", torch.float64, 300, 3749, "tiled"),
]  # fmt: skip


@requires_cpu_extension
@pytest.mark.parametrize("op,dtype,n,d,path", GRAM_RULE_CASES)
def test_auto_takes_the_gram_path_by_each_ops_rule(op, dtype, n, d, path):
    """"auto" takes the few-particle Gram path (off the AMX path) by a rule of its own for each op, measured
    where the two paths cross: the more particles, the more features the Gram path needs (before 2026-12-05
    it took up to 64 particles at any d: 64 x 8 fp32, the step with H given, 37 against 11 us). Each op as the
    algorithm `path` gives it (and phi not as the other one), within fp32 (fp64) rounding of the float64
    reference: svgd_step with H given, median_bandwidth and svgd_step with the median rule (the same H), rbf_kernel(x)
    (no algorithm argument: the one Gram pass of rbf_kernel_median equals it bit for bit only where both took
    the Gram path, its other paths only where neither did). fp16 particles follow fp32's rule."""
    module = bmt_fast._extension.CPU.module
    torch.manual_seed(n + d)
    x, score = particles(n, d, dtype=dtype)
    assert module.takes_gram_path(x, op) == (path == "gram")
    other = "gram" if path == "tiled" else "tiled"
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    if op == "svgd_step":
        h = torch.tensor(2.0 * d, dtype=torch.float64)
        auto = torch.ops.bmt_fast.svgd_step(x, score, h, "auto")
        assert torch.equal(auto, torch.ops.bmt_fast.svgd_step(x, score, h, path))
        assert not torch.equal(auto, torch.ops.bmt_fast.svgd_step(x, score, h, other))
        assert relative_error(auto, reference_phi(x.double(), score.double(), h)) <= tol
        half, half_score = x.half(), score.half()
        half_path = "gram" if module.takes_gram_path(half, op) else "tiled"
        assert dtype == torch.float64 or half_path == path
        assert torch.equal(torch.ops.bmt_fast.svgd_step(half, half_score, h, "auto"),
                           torch.ops.bmt_fast.svgd_step(half, half_score, h, half_path))
    elif op == "median_bandwidth":
        median = torch.ops.bmt_fast.median_bandwidth(x, "auto")  # (the paths' medians often agree bit for bit)
        assert torch.equal(median, torch.ops.bmt_fast.median_bandwidth(x, path))
        assert abs(float(median) / float(reference.median_bandwidth(x.double())) - 1) <= tol
        phi = torch.ops.bmt_fast.svgd_step(x, score, None, "auto")
        assert torch.equal(phi, torch.ops.bmt_fast.svgd_step(x, score, None, path))
        assert not torch.equal(phi, torch.ops.bmt_fast.svgd_step(x, score, None, other))
    else:
        k, h = torch.ops.bmt_fast.rbf_kernel_median(x)
        assert torch.equal(h, torch.ops.bmt_fast.median_bandwidth(x))
        assert torch.equal(k, torch.ops.bmt_fast.rbf_kernel(x, x, h))
        assert relative_error(k, reference.rbf_kernel(x.double(), x.double(), h.double())) <= tol


@requires_cpu_extension
def test_takes_gram_path_refuses_unknown_ops_and_shapes():
    module = bmt_fast._extension.CPU.module
    with pytest.raises(RuntimeError, match="op must be"):
        module.takes_gram_path(torch.randn(4, 3), "rbf_kernel_median")
    with pytest.raises(RuntimeError, match="must be 2-D"):
        module.takes_gram_path(torch.randn(4), "svgd_step")


@requires_amx
@pytest.mark.parametrize("n,d", [(65, 32), (300, 129), (513, 40), (129, 1024), (600, 2050)])
@pytest.mark.parametrize("bandwidth", ["median", "spread", 1e-6])
def test_fp32_on_amx_where_torch_allows_bf16_matmuls(n, d, bandwidth):
    """fp32 particles with torch.set_float32_matmul_precision("medium") (oneDNN's fp32 matmul precision
    bf16, which ATen's own fp32 GEMMs then follow on this CPU) take the AMX path: fp32 phi within 2 bf16 ulps
    of the float64 reference and, with K as the same tiles give it (rbf_kernel under the same setting, its
    own terms 0), the documented arithmetic (amx_phi; split at H = 1e-6) to fp32 rounding: with d in the thousands the distances' fp32 rounding
    moves K across a bf16 rounding boundary now and then, so an emulation that computes K itself differs by
    those flips (2e-4 at 600 x 2050). The default precision ("highest") keeps IEEE fp32 on the same inputs;
    a NaN in either input still gets its clear error (the kernel's flag, as for bf16)."""
    torch.manual_seed(n + d)
    x, score = particles(n, d, dtype=torch.float32)
    if bandwidth == 1e-6:
        x = x * 7
    elif bandwidth == "spread":  # about the mean squared distance (2 d 1.5^2): K ~ 1/e, every pair counts
        bandwidth = 4.5 * d
    h = None if bandwidth == "median" else torch.tensor(bandwidth, dtype=torch.float64)
    expected = reference_phi(x.double(), score.double(), h)
    ieee = torch.ops.bmt_fast.svgd_step(x, score, h, "tiled")
    with float32_matmul_precision("medium"):
        phi = torch.ops.bmt_fast.svgd_step(x, score, h, "tiled")
        hh = float(torch.ops.bmt_fast.median_bandwidth(x, "tiled")) if h is None else bandwidth
        k = torch.ops.bmt_fast.rbf_kernel(x, x, torch.tensor(hh, dtype=torch.float64)).double().fill_diagonal_(0)
        bad = score.clone()
        bad[n // 2, d // 3] = float("nan")
        with pytest.raises(ValueError, match="score"):
            bmt_fast.svgd_step(x, bad, "median" if h is None else h, backend="cpu")
    assert phi.dtype == torch.float32 and relative_error(ieee, expected) < 1e-5
    assert relative_error(phi, expected) <= 2 * 2.0**-8
    if bandwidth != 1e-6:  # (there the particles do not interact: phi = score / n on every path)
        assert relative_error(phi, ieee) > 1e-5
    assert relative_error(phi, amx_phi(k, x, score, hh)) <= 1e-5


@requires_cpu_extension
@pytest.mark.parametrize("n,d,dtype", [(600, 300, torch.float64), (300, 260, torch.float64), (700, 257, torch.float32)])
def test_tiled_step_takes_k_from_the_median_pass_tiles(n, d, dtype):
    """The GEMM tiles of the median's pass are kept (d >= 128, n^2 within 64 MiB; beyond the fused kernel's
    256 features, or with BMT_FAST_CPU_FUSED=0 from 128) and the step's K comes from them: phi by the median rule is phi with the same H given, where the step computes its own tiles (bit for
    bit in float64, whose H median_bandwidth returns unrounded; fp32 to H's rounding). Ragged tiles of 512
    (600, 700), the window's median and the selection (300)."""
    torch.manual_seed(n)
    x, score = particles(n, d, dtype=dtype)
    by_rule = torch.ops.bmt_fast.svgd_step(x, score, None, "tiled")
    h = torch.ops.bmt_fast.median_bandwidth(x, "tiled").double()
    given = torch.ops.bmt_fast.svgd_step(x, score, h, "tiled")
    if dtype == torch.float64:
        assert torch.equal(by_rule, given)
    else:
        assert relative_error(by_rule, given) <= 1e-5
    assert relative_error(by_rule, reference_phi(x.double(), score.double(), h)) <= (1e-12 if dtype == torch.float64 else 1e-5)


@requires_amx
@pytest.mark.parametrize("n,d", [(700, 600), (300, 515)])
def test_amx_step_takes_k_from_the_median_pass_dot_products(n, d):
    """With the median rule and d >= 512 (n^2 fp32 within 64 MiB) the step keeps the dot products of the
    median's pass (upper-triangle tiles from each block's diagonal, written with their transposes) and forms
    K from them instead of computing them again: phi as with the same H given, where the step computes its
    own tiles (fp32 under "medium", so that only the fp32 rounding of H differs). Ragged blocks and tiles
    (700 = 5 x 128 + 60 rows, 512 + 188 columns); the window's median and the selection (300)."""
    torch.manual_seed(n)
    x, score = particles(n, d, dtype=torch.float32)
    with float32_matmul_precision("medium"):
        by_rule = torch.ops.bmt_fast.svgd_step(x, score, None, "tiled")
        h = torch.ops.bmt_fast.median_bandwidth(x, "tiled").double()
        given = torch.ops.bmt_fast.svgd_step(x, score, h, "tiled")
    assert relative_error(by_rule, given) <= 1e-5
    assert relative_error(by_rule, reference_phi(x.double(), score.double(), h)) <= 2 * 2.0**-8


@requires_amx
def test_info_reports_the_fp32_products():
    """`python -m bmt_fast.info` says which products fp32 particles get, as the setting stands."""
    from bmt_fast import info

    assert info.collect()["cpu_fp32_matmul"] == "ieee"
    with float32_matmul_precision("medium"):
        assert info.collect()["cpu_fp32_matmul"].startswith("bf16 on AMX")


@requires_amx
def test_bf16_amx_can_be_turned_off(tmp_path):
    """BMT_FAST_CPU_AMX=0 keeps bf16 on the fp32 path (bit for bit the fp32 step, kernel and kernel
    gradient rounded to bf16); by default the AMX path runs, and its results differ from those."""
    import subprocess
    import sys

    script = tmp_path / "check.py"
    script.write_text(
        "import torch, bmt_fast\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(300, 129).bfloat16(); s = torch.randn(300, 129).bfloat16(); h = torch.tensor(50.0)\n"
        "phi = torch.ops.bmt_fast.svgd_step(x, s, h, 'tiled')\n"
        "fp32 = torch.ops.bmt_fast.svgd_step(x.float(), s.float(), h, 'tiled').bfloat16()\n"
        "k = torch.ops.bmt_fast.rbf_kernel(x, x, h)\n"
        "xf = x.float()  # (one tensor: a self kernel, as k's)\n"
        "k32 = torch.ops.bmt_fast.rbf_kernel(xf, xf, h).bfloat16()\n"
        "g = torch.randn(300, 300).bfloat16()\n"
        "gx = torch.ops.bmt_fast.rbf_kernel_backward(g, x, x, k, h, [True, True, False])[1]\n"
        "gx32 = torch.ops.bmt_fast.rbf_kernel_backward(g.float(), xf, xf, k.float(), h, [True, True, False])[1]\n"
        "gx32 = gx32.bfloat16()\n"
        "amx = bmt_fast._extension.CPU.module.build_info()['cpu_bf16_amx']\n"
        "print(amx, torch.equal(phi, fp32), torch.equal(k, k32), torch.equal(gx, gx32))\n"
    )
    run = lambda **env: subprocess.run([sys.executable, str(script)], env=subprocess_env(**env),  # noqa: E731
                                       capture_output=True, text=True)  # fmt: skip
    off, on = run(BMT_FAST_CPU_AMX="0"), run()
    assert off.returncode == 0 and on.returncode == 0, off.stderr[-2000:] + on.stderr[-2000:]
    assert off.stdout.split() == ["False", "True", "True", "True"]
    assert on.stdout.split() == ["True", "False", "False", "False"]


def _cpu_flag(name: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return name in f.read().split()
    except OSError:
        return False


@requires_amx
@pytest.mark.skipif(not _cpu_flag("avx512_bf16"), reason="the CPU lacks AVX512-BF16")
def test_bf16_amx_epilogue_roundings_agree(tmp_path):
    """The AMX epilogue's two roundings of K to bf16 (vcvtneps2bf16 where the CPU has AVX512-BF16, and the
    portable bit arithmetic that BMT_FAST_CPU_AVX512BF16=0 selects) give the same steps bit for bit: ragged
    blocks, K entries that underflow to 0 (a tiny H), the median rule; rbf_kernel's K, one set and two."""
    import subprocess
    import sys

    script = tmp_path / "check.py"
    script.write_text(
        "import sys, torch, bmt_fast  # noqa: F401 (the ops)\n"
        "torch.manual_seed(0)\n"
        "out = []\n"
        "for n, d, h in [(300, 129, 50.0), (1024, 64, None), (517, 40, 1e-3), (129, 1024, 2000.0)]:\n"
        "    x = (torch.randn(n, d) * 3).bfloat16(); s = torch.randn(n, d).bfloat16()\n"
        "    hb = None if h is None else torch.tensor(h)\n"
        "    out.append(torch.ops.bmt_fast.svgd_step(x, s, hb, 'tiled'))\n"
        "    out.append(torch.ops.bmt_fast.rbf_kernel(x, x if h is None else s, torch.tensor(h or float(d))))\n"
        "torch.save(out, sys.argv[1])\n"
    )
    results = {}
    for name, env in (("native", {}), ("portable", {"BMT_FAST_CPU_AVX512BF16": "0"})):
        path = tmp_path / f"{name}.pt"
        run = subprocess.run([sys.executable, str(script), str(path)], env=subprocess_env(**env),
                             capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        results[name] = torch.load(path)
    assert len(results["native"]) == len(results["portable"]) == 8
    for native, portable in zip(results["native"], results["portable"]):
        assert native.dtype == torch.bfloat16 and torch.equal(native, portable)


@requires_cpu_extension
@pytest.mark.parametrize("isa", ["base", "v3", "v4"])
def test_every_isa_build_is_correct(isa, tmp_path):
    """The baseline, AVX2 and AVX-512 builds of the kernels each give the reference result (the tiled path
    by the fused kernel in both its forms, by rows and by block pairs, and by feature chunks too
    (70 x 300), and rbf_kernel(x) by the fused distances;
    the Gram path's apply pass direct and packed, whose last row block of 36 or 37 particles is 4 rows, or 8
    with padding, in the AVX-512 build), and each reports a NaN
    in phi (svgd_step_into's flag, tracked in their own apply passes); their vectorised
    median window gives the radix passes' median bit for bit."""
    import subprocess
    import sys

    script = tmp_path / "check.py"
    script.write_text(
        "import torch, bmt_fast\n"
        "from bmt_fast import reference\n"
        "torch.manual_seed(0)\n"
        "for n, d, algo in [(70, 37, 'tiled'), (70, 5, 'tiled'), (1100, 30, 'tiled'), (2050, 6, 'tiled'), (70, 100, 'tiled'),\n"
        "                   (70, 300, 'tiled'),\n"
        "                   (13, 3001, 'gram'), (12, 77, 'gram'),\n"
        "                   (40, 515, 'gram'), (37, 300, 'gram'), (36, 130, 'gram'), (9, 2048, 'gram')]:\n"
        "    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):\n"
        "        x = torch.randn(n, d, dtype=torch.float64); s = torch.randn(n, d, dtype=torch.float64)\n"
        "        phi = torch.ops.bmt_fast.svgd_step(x.to(dt), s.to(dt), None, algo)\n"
        "        ref = reference.svgd_step(x.to(dt).double(), s.to(dt).double(), None)\n"
        "        err = float((phi.double() - ref).abs().max() / ref.abs().max())\n"
        "        assert err < {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dt], (n, d, dt, err)\n"
        "        out = torch.empty_like(phi)\n"
        "        finite = torch.ops.bmt_fast.svgd_step_into(x.to(dt), s.to(dt), None, algo, out=out)\n"
        "        assert bool(finite) and torch.equal(out, phi), (n, d, dt)\n"
        "        for i, k in ((0, 0), (n - 1, d - 1), (n // 2, d // 3)):\n"
        "            sb = s.to(dt); sb[i, k] = float('nan')\n"
        "            assert not bool(torch.ops.bmt_fast.svgd_step_into(x.to(dt), sb, None, algo, out=out)), (n, d, dt, i, k)\n"
        "    x = torch.randn(n, d) * 10; s = torch.randn(n, d); h = torch.tensor(1e-6, dtype=torch.float64)\n"
        "    phi = torch.ops.bmt_fast.svgd_step(x, s, h, algo)\n"
        "    ref = reference.svgd_step(x.double(), s.double(), h)\n"
        "    err = float((phi.double() - ref).abs().max() / ref.abs().max())\n"
        "    assert err < 1e-6, ('a tiny H', n, d, err)  # the own term k_ii = 1 is not folded\n"
        "import os\n"
        "for n, d, dt in [(700, 5, torch.float32), (600, 3, torch.float64), (1100, 37, torch.bfloat16)]:\n"
        "    x = (torch.randn(n, d, dtype=torch.float64) * 3).to(dt)\n"
        "    os.environ['BMT_FAST_MEDIAN_WINDOW'] = 'require'  # the vectorised window pass, not its fallback\n"
        "    windowed = float(torch.ops.bmt_fast.median_bandwidth(x, 'tiled'))\n"
        "    os.environ['BMT_FAST_MEDIAN_WINDOW'] = '0'\n"
        "    assert windowed == float(torch.ops.bmt_fast.median_bandwidth(x, 'tiled')), (n, d, dt)\n"
        "    del os.environ['BMT_FAST_MEDIAN_WINDOW']\n"
        "for n, d in [(70, 37), (300, 200), (1030, 20)]:  # rbf_kernel(x) by the fused distances (1030: upper triangle)\n"
        "    x = torch.randn(n, d, dtype=torch.float64); h = torch.tensor(float(d), dtype=torch.float64)\n"
        "    for dt in (torch.float32, torch.float64):\n"
        "        k = torch.ops.bmt_fast.rbf_kernel(x.to(dt), x.to(dt), h)\n"
        "        ref = reference.rbf_kernel(x.to(dt).double(), x.to(dt).double(), h)\n"
        "        err = float((k.double() - ref).abs().max())\n"
        "        assert err < {torch.float64: 1e-12, torch.float32: 2e-5}[dt] and torch.equal(k, k.T), (n, d, dt, err)\n"
        "print(bmt_fast._extension.CPU.module.build_info()['cpu_isa'])\n"
    )
    env = subprocess_env(BMT_FAST_CPU_ISA=isa)
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    if "lacks the instructions" in result.stderr:
        pytest.skip(f"this CPU cannot run the {isa} build")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == isa


@requires_cpu_extension
def test_many_particles_use_bounded_memory(tmp_path):
    """n=65536, d=64 fp32 runs without any n x n buffer (naive torch would need 17 GB per matrix)."""
    import subprocess
    import sys

    script = tmp_path / "memory.py"
    script.write_text(
        "import resource, torch, bmt_fast\n"
        "x = torch.randn(65536, 64); s = torch.randn(65536, 64)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "phi = bmt_fast.svgd_step(x, s, 64.0, check_inputs=False)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "assert torch.isfinite(phi).all()\n"
        "print((after - before) / 1024)\n"
    )
    result = subprocess.run([sys.executable, str(script)], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    extra_mib = float(result.stdout.strip())
    assert extra_mib < 200, f"peak extra memory {extra_mib:.0f} MiB"


def test_bandwidth_rule_constant_is_shared():
    """The floor in the C++ kernels equals the Python reference's."""
    if not COMPILED_CPU:
        pytest.skip("bmt_fast._C not built")
    info = bmt_fast._extension.CPU.module.build_info()
    assert info["bandwidth_floor"] == reference.BANDWIDTH_FLOOR
    assert math.isclose(float(bmt_fast.median_bandwidth(torch.zeros(3, 2))), reference.BANDWIDTH_FLOOR, rel_tol=1e-6)


@requires_cpu_extension
@pytest.mark.parametrize("bandwidth", [None, torch.tensor(2.0, dtype=torch.float64)])
@pytest.mark.parametrize("algorithm", ["auto", "tiled", "gram"])
def test_opcheck_svgd_step(bandwidth, algorithm):
    x, score = particles(9, 5)
    torch.library.opcheck(torch.ops.bmt_fast.svgd_step.default, (x, score, bandwidth, algorithm))


@requires_cpu_extension
def test_opcheck_median_bandwidth():
    for algorithm in ("auto", "tiled", "gram"):
        torch.library.opcheck(torch.ops.bmt_fast.median_bandwidth.default, (torch.randn(11, 4), algorithm))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_torch_compile_fullgraph_with_a_float_bandwidth_argument(backend):
    """A float H passed as an argument: torch.compile makes it symbolic at its second value, and the checks'
    math on it had broken the graph ("torch.* op returned non-Tensor": fullgraph failed); it now goes into the
    graph as a tensor, svgd_step's and rbf_kernel's alike, each value's result the eager one's."""
    step = torch.compile(lambda a, s, h: bmt_fast.svgd_step(a, s, h, backend=backend, check_inputs=False),
                         backend="aot_eager", fullgraph=True)  # fmt: skip
    kernel = torch.compile(lambda a, h: bmt_fast.rbf_kernel(a, None, h, backend=backend, check_inputs=False),
                           backend="aot_eager", fullgraph=True)  # fmt: skip
    x, score = particles(10, 4)
    for h in (1.5, 2.0, 3.0):
        torch.testing.assert_close(step(x, score, h), bmt_fast.svgd_step(x, score, h, backend=backend))
        torch.testing.assert_close(kernel(x, h), bmt_fast.rbf_kernel(x, None, h, backend=backend))


@requires_cpu_extension
def test_torch_compile_fullgraph():
    def step(x, score):
        return x + 0.1 * bmt_fast.svgd_step(x, score, backend="cpu", check_inputs=False)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (5, 9):  # a second size goes through the dynamic-shape path
        x, score = particles(n, 3)
        torch.testing.assert_close(compiled(x, score), step(x, score))


def test_torch_compile_with_the_checks_on_runs_each_call_as_uncompiled():
    """torch.compile of code that calls the public functions with their checks on (the default): each call runs
    eagerly, one graph break without warnings, and gives the uncompiled result and errors. Traced, the checks'
    reads (.item() of the NaN/Inf scans, the kernels' finiteness flag) had broken the graph several times per
    call, with torch's logged warning for every .item() and a UserWarning for the CPU allocator's call; under
    fullgraph=True the error now names the reason, and torch.export says to pass check_inputs=False."""
    import warnings

    import torch._dynamo

    def f(x, score):
        phi = bmt_fast.svgd_step(x, score) + bmt_fast.svgd_step(x, score, torch.tensor(0.8, dtype=x.dtype))
        return x + 0.1 * phi, bmt_fast.rbf_kernel(x).sum(), bmt_fast.median_bandwidth(x) * 2.0

    x, score = particles(40, 6)
    x.requires_grad_(True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(f, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            results = compiled(x, score)
            expected = f(x, score)
            for got, want in zip(results, expected):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            (grad,) = torch.autograd.grad(results[1], x)
            torch.testing.assert_close(grad, torch.autograd.grad(expected[1], x)[0], rtol=0, atol=0)
    assert not [w for w in caught if "Dynamo" in str(w.message) or "bmt_fast" in str(w.message)]
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert breaks and all("input checks read values back" in reason for reason in breaks), dict(breaks)
    bad = score.detach().clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="score contains 1 NaN/Inf value"):
        compiled(x, bad)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="pass check_inputs=False for one graph"):
        torch.compile(lambda a, s: bmt_fast.svgd_step(a, s), backend="eager", fullgraph=True)(x, score)
    torch._dynamo.reset()

    class Step(torch.nn.Module):
        def forward(self, a, s):
            return bmt_fast.svgd_step(a, s, 1.5)

    with pytest.raises(RuntimeError, match="svgd_step with check_inputs=True cannot be exported.*pass check_inputs=False"):
        torch.export.export(Step(), (x.detach(), score))


@requires_cpu_extension
def test_dynamic_shapes_compile_once_and_export():
    """torch.compile(dynamic=True) compiled svgd_step and rbf_kernel again for every n and d (the backend
    choice's memo, keyed on the sizes, specialised them), and torch.export with a dynamic n failed (a SymInt
    is unhashable)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def f(x, score):
        return bmt_fast.svgd_step(x, score, 1.5, check_inputs=False) + bmt_fast.rbf_kernel(x, None, 2.0, check_inputs=False).sum(1, keepdim=True)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, dynamic=True, fullgraph=True)
    for n, d in ((8, 3), (12, 3), (20, 5)):
        x, score = particles(n, d, dtype=torch.float32)
        torch.testing.assert_close(compiled(x, score), f(x, score))
    assert counter.frame_count == 1
    torch._dynamo.reset()

    class Step(torch.nn.Module):
        def forward(self, x, score):
            return f(x, score)

    n = torch.export.Dim("n", min=2, max=1024)
    x, score = particles(8, 3, dtype=torch.float32)
    program = torch.export.export(Step(), (x, score), dynamic_shapes=({0: n}, {0: n}))
    x, score = particles(13, 3, dtype=torch.float32)
    torch.testing.assert_close(program.module()(x, score), f(x, score))


@pytest.mark.parametrize("backend", ["torch", *(["cpu"] if COMPILED_CPU else [])])
def test_the_median_rule_compiles_once_for_every_n(backend):
    """torch.compile(dynamic=True) of the median rule: the reference backend ("auto" where no compiled one
    runs) had specialised n (math.log(n + 1) on the symbolic n; a branch on the parity of n * n): a graph per
    n. Now one for odd and even n, each call as the eager one."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def f(x, score):
        return (bmt_fast.svgd_step(x, score, backend=backend, check_inputs=False),
                bmt_fast.rbf_kernel(x, backend=backend, check_inputs=False),
                bmt_fast.median_bandwidth(x, backend=backend, check_inputs=False))  # fmt: skip

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, dynamic=True, fullgraph=True)
    counts = []
    for n in (5, 8, 17, 32):
        x, score = particles(n, 3)
        for got, expected in zip(compiled(x, score), f(x, score)):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
        counts.append(counter.frame_count)  # (the first size's may count twice: dynamo restarts for the floor)
    assert counts[1:] == counts[:1] * 3, counts
    torch._dynamo.reset()


def test_a_fake_tensor_trace_leaves_later_plain_calls_alone():
    """make_fx(tracing_mode="fake") of a call with a float bandwidth: the bandwidth's tensor, cached per
    value, was the trace's FakeTensor, and every later plain call with that value failed ("convert all
    Tensors to FakeTensors"), rbf_kernel and SVGD's too."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, score = particles(8, 5)
    h = 0.7731  # a value no other test uses (the cache is per process)
    graph = make_fx(lambda a, b: bmt_fast.svgd_step(a, b, h, check_inputs=False), tracing_mode="fake")(x, score)
    expected = reference.svgd_step(x, score, torch.tensor(h, dtype=torch.float64))
    torch.testing.assert_close(graph(x, score), expected)
    torch.testing.assert_close(bmt_fast.svgd_step(x, score, h), expected)
    torch.testing.assert_close(bmt_fast.rbf_kernel(x, None, h), reference.rbf_kernel(x, None, torch.tensor(h)))


@requires_cpu_extension
def test_torch_compile_fullgraph_with_out_beyond_the_gram_path():
    """Many fp32 particles with 32+ features, where the API asks whether the AMX path (and its finiteness
    flag) applies, which depends on torch's fp32 matmul precision: traced without a graph break (under
    compilation the op's result is copied into out), under either precision."""

    def step(x, score, out):
        return bmt_fast.svgd_step(x, score, 30.0, backend="cpu", check_inputs=False, out=out)

    x, score = particles(70, 40, dtype=torch.float32)
    for precision in ("highest", "medium"):
        with float32_matmul_precision(precision):
            compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
            out, expected = torch.empty_like(x), torch.empty_like(x)
            compiled(x, score, out)
            step(x, score, expected)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            torch._dynamo.reset()


@requires_cpu_extension
def test_torch_compile_fullgraph_with_out():
    """out= traces too: its checks use nothing dynamo refuses (it skipped the fake-tensor test and a
    functools.cache of the backend's), and the op writes phi into the caller's tensor."""

    def step(x, score, out):
        return bmt_fast.svgd_step(x, score, backend="cpu", check_inputs=False, out=out)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x, score = particles(5, 3)
    out = torch.empty_like(x)
    compiled(x, score, out)
    torch.testing.assert_close(out, step(x, score, torch.empty_like(x)))


SERIAL_SCRIPT = """
import sys, torch, bmt_fast
from bmt_fast import _extension
torch.manual_seed(0)
out = {"serial_max_work": _extension.CPU.module.build_info()["serial_max_work"]}
# (n, d, dtype): the Gram path with two column chunks, the tiled path, fp32 feature chunks, AMX chunks
for n, d, dtype in [(20, 300, torch.float32), (100, 50, torch.float32), (100, 128, torch.float32),
                    (150, 150, torch.float64), (64, 512, torch.bfloat16)]:
    x = (torch.randn(n, d, dtype=torch.float64) * 1.5).to(dtype)
    s = torch.randn(n, d, dtype=torch.float64).to(dtype)
    h = torch.ops.bmt_fast.median_bandwidth(x, "auto")
    xg = x.detach().clone().requires_grad_()
    k = bmt_fast.rbf_kernel(xg, bandwidth=h.double())
    (k * torch.linspace(-1, 1, n * n, dtype=torch.float64).to(dtype).view(n, n)).sum().backward()
    out[(n, d, str(dtype))] = {
        "x": x, "score": s, "h": h,
        "phi": torch.ops.bmt_fast.svgd_step(x, s, None, "auto"),
        "kernel": k.detach(), "grad": xg.grad,
        "threads": torch.get_num_threads(),
    }
torch.save(out, sys.argv[1])
"""


@requires_cpu_extension
def test_small_calls_run_on_one_thread_with_the_threaded_results(tmp_path):
    """Ops whose work (pairs x (features + 32)) is at most build_info()["serial_max_work"] run on the calling
    thread alone (their parallel regions each woke the other threads for more than the work took); the thread
    count is restored after the call, also when the op raises. Their results on every path (Gram, tiled,
    fp32 feature chunks, AMX chunks; the step with the median rule, rbf_kernel and its gradient) agree with
    those of a process where every call is threaded (BMT_FAST_CPU_SERIAL_MAX_WORK=0) and with float64."""
    import subprocess
    import sys

    x, score = particles(100, 50, dtype=torch.float32)
    threads = torch.get_num_threads()
    phi = torch.ops.bmt_fast.svgd_step(x, score, None, "auto")
    assert torch.get_num_threads() == threads
    with pytest.raises(RuntimeError, match="bandwidth"):
        torch.ops.bmt_fast.svgd_step(x, score, torch.tensor(math.nan, dtype=torch.float64), "tiled")
    assert torch.get_num_threads() == threads
    assert relative_error(phi, reference_phi(x.double(), score.double())) < 1e-5

    script = tmp_path / "serial.py"
    script.write_text(SERIAL_SCRIPT)
    results = {}
    for name, bound in (("default", None), ("threaded", "0")):
        path = tmp_path / f"{name}.pt"
        env = subprocess_env()
        env.pop("BMT_FAST_CPU_SERIAL_MAX_WORK", None)  # (CI also runs these tests with it set to 0)
        if bound is not None:
            env["BMT_FAST_CPU_SERIAL_MAX_WORK"] = bound
        run = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        results[name] = torch.load(path)
    assert results["default"].pop("serial_max_work") > 0 and results["threaded"].pop("serial_max_work") == 0
    assert results["default"].keys() == results["threaded"].keys() and len(results["default"]) == 5
    for key, alone in results["default"].items():
        threaded = results["threaded"][key]
        tol = {"torch.float32": 1e-5, "torch.float64": 1e-12, "torch.bfloat16": 2e-2}[key[2]]
        assert torch.equal(alone["x"], threaded["x"]) and alone["threads"] == threaded["threads"] == threads
        x64, s64 = alone["x"].double(), alone["score"].double()
        for result in (alone, threaded):
            assert abs(float(result["h"]) / float(reference.median_bandwidth(x64)) - 1) <= tol
            assert relative_error(result["phi"], reference_phi(x64, s64)) <= tol
            assert relative_error(result["kernel"], reference.rbf_kernel(x64, x64, result["h"].double())) <= tol
        for name in ("h", "phi", "kernel", "grad"):
            assert relative_error(alone[name], threaded[name]) <= tol, (key, name)


FUSED_SCRIPT = """
import sys, torch, bmt_fast
torch.manual_seed(0)
out = {}
# (n, d, dtype, H): the fused step's two forms (per-lane sums up to 24 features, W's rows beyond), ragged
# row blocks and packed column blocks, its widest (256) and the median pass's kept dot products (160); bf16
# and fp16 through the fp32 path (d < 32); several row blocks per thread (3000 x 40, 2000 x 5); the symmetric
# form over block pairs in both forms (1030 x 160, 3000 x 40; 2100 x 9, 2048 x 24).
for n, d, dtype, h in [(70, 1, torch.float32, None), (130, 5, torch.float64, None), (257, 16, torch.float32, 2.0),
                       (70, 24, torch.float64, 3.0), (70, 25, torch.float32, None), (200, 77, torch.float32, None), (1030, 160, torch.float32, None),
                       (600, 256, torch.float64, 50.0), (300, 9, torch.bfloat16, None), (90, 20, torch.float16, None),
                       (3000, 40, torch.float32, None), (2000, 5, torch.float64, 0.7), (200, 7, torch.float32, 1e-6),
                       (2100, 9, torch.float32, None), (2048, 24, torch.float64, 2.0)]:
    x = (torch.randn(n, d, dtype=torch.float64) * 1.5).to(dtype)
    s = torch.randn(n, d, dtype=torch.float64).to(dtype)
    bandwidth = None if h is None else torch.tensor(h, dtype=torch.float64)
    out[(n, d, str(dtype), h)] = {"x": x, "score": s, "phi": torch.ops.bmt_fast.svgd_step(x, s, bandwidth, "tiled")}
torch.save(out, sys.argv[1])
"""


@requires_cpu_extension
def test_fused_step_matches_the_gemm_tiles_and_float64(tmp_path):
    """The many-particle step with up to 256 features takes the fused kernel (no tile of dot products in
    memory); BMT_FAST_CPU_FUSED=0 keeps the GEMM tiles. Both give the float64 reference's phi (fp32: 1e-5,
    fp64: 1e-12, also with every call threaded), and each other's, including a tiny H where only the own
    term k_ii = 1 is left."""
    variants = {"fused": {}, "threaded": {"BMT_FAST_CPU_SERIAL_MAX_WORK": "0"}, "tiles": {"BMT_FAST_CPU_FUSED": "0"}}
    results = run_cpu_variants(tmp_path, FUSED_SCRIPT, variants)
    assert len(results["fused"]) == 15
    for key, fused in results["fused"].items():
        n, d, dtype, h = key
        tol = {"torch.float32": 1e-5, "torch.float64": 1e-12, "torch.bfloat16": 2e-2, "torch.float16": 2e-3}[dtype]
        x64, s64 = fused["x"].double(), fused["score"].double()
        expected = reference_phi(x64, s64, h)
        for name in results:
            phi = results[name][key]["phi"]
            assert phi.dtype == fused["x"].dtype and phi.shape == (n, d)
            assert relative_error(phi, expected) <= tol, (key, name)
        assert relative_error(fused["phi"], results["tiles"][key]["phi"]) <= tol, key


@requires_cpu_extension
@pytest.mark.parametrize("n,d", [(1000, 128), (2048, 128), (1000, 24), (1100, 300)])  # fused: rows, block pairs
def test_fp32_step_of_tight_clusters_far_apart(n, d):
    """fp32 particles in two clusters 0.05 wide whose centres are drawn N(0, 10^2) per feature, H from the
    distances within a cluster: the shifted rows' squared norms are ~10^4 times the distances, so each distance
    carries its norms' rounding, and a row's norm error moves all of its distances alike (phi_i by that error
    / H of itself, where the dot products' errors average out over the row). The fused kernel's norms, summed
    in fp32 one term after another, had put phi 3.6-5.1e-3 off at 1000 x 128 (torch's fp32 step 1.0-1.5e-3);
    summed in double and rounded once, it stays within twice torch's error. So do the GEMM tiles (1100 x 300
    here; all four under BMT_FAST_CPU_FUSED=0, as the tests' last pass runs), whose norms torch's fp32 sum of
    the squares had given: with few features, where the norms' error is most of it, 1000 x 24 now 0.35-0.5 of
    torch's error on either path (the tiles' had been 0.95 of it)."""
    generator = torch.Generator().manual_seed(n + d)
    centres = torch.randn(2, d, generator=generator, dtype=torch.float64) * 10
    x = (centres[torch.arange(n) % 2] + 0.05 * torch.randn(n, d, generator=generator, dtype=torch.float64)).float()
    score = torch.randn(n, d, generator=generator).float()
    same = x[0::2].double()
    h = torch.tensor(float(torch.cdist(same, same).square().median()), dtype=torch.float64)
    expected = reference_phi(x.double(), score.double(), h)
    torch_error = relative_error(reference.svgd_step(x, score, h.float()), expected)
    phi = torch.ops.bmt_fast.svgd_step(x, score, h, "auto")
    assert_within(phi, expected, torch_error)
    if d <= 32:
        assert relative_error(phi, expected) <= 0.6 * torch_error


GEMM_TILE_NORMS_SCRIPT = """
import torch, bmt_fast
from bmt_fast import reference
torch.manual_seed(0)
for n, d in [(300, 1), (300, 5), (300, 17), (300, 63), (600, 130)]:
    for dt, tol in ((torch.float32, 2e-5), (torch.float64, 1e-11)):
        x, s = torch.randn(n, d, dtype=torch.float64) + 3.0, torch.randn(n, d, dtype=torch.float64)
        h = torch.tensor(0.7 * d, dtype=torch.float64)
        phi = torch.ops.bmt_fast.svgd_step(x.to(dt), s.to(dt), h, "tiled")
        ref = reference.svgd_step(x, s, h)
        assert float((phi.double() - ref).abs().max() / ref.abs().max()) < tol, (n, d, dt)
        y = torch.randn(n // 2, d, dtype=torch.float64)
        k = torch.ops.bmt_fast.rbf_kernel(x.to(dt), y.to(dt), h)
        assert float((k.double() - reference.rbf_kernel(x, y, h)).abs().max()) < tol, (n, d, dt)
print(bmt_fast._extension.CPU.module.build_info()["cpu_isa"])
"""


@requires_cpu_extension
@pytest.mark.parametrize("isa", ["base", "v3", "v4"])
def test_gemm_tile_norms_in_every_isa_build(tmp_path, isa):
    """The GEMM tiles' row norms (one pass in double per row: whole groups of vectors, single vectors and a
    ragged last one) in the baseline, AVX2 and AVX-512 builds, fp32 and fp64, through the step and the
    two-set kernel with the fused kernels off, against the float64 reference."""
    import subprocess
    import sys

    script = tmp_path / "norms.py"
    script.write_text(GEMM_TILE_NORMS_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=subprocess_env(BMT_FAST_CPU_ISA=isa, BMT_FAST_CPU_FUSED="0"))  # fmt: skip
    if "lacks the instructions" in result.stderr:
        pytest.skip(f"this CPU cannot run the {isa} build")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == isa


@requires_cpu_extension
@pytest.mark.parametrize("n,d,dtype", [(300, 3, torch.float32), (200, 40, torch.float64), (150, 9, torch.bfloat16)])
def test_fused_step_reports_a_nan_in_phi(n, d, dtype):
    """svgd_step_into's flag on the fused path: tracked in the kernel's last pass where phi has the compute
    type (fp32, fp64), by a scan of out after the copy otherwise; out receives svgd_step's phi."""
    x, score = particles(n, d, dtype=dtype)
    out = torch.empty_like(x)
    assert bool(torch.ops.bmt_fast.svgd_step_into(x, score, None, "tiled", out=out))
    assert torch.equal(out, torch.ops.bmt_fast.svgd_step(x, score, None, "tiled"))
    for i, k in ((0, 0), (n - 1, d - 1), (n // 2, d // 3)):
        bad = score.clone()
        bad[i, k] = math.nan
        assert not bool(torch.ops.bmt_fast.svgd_step_into(x, bad, None, "tiled", out=out)), (i, k)
        assert torch.isnan(out[i, k])


@requires_cpu_extension
@pytest.mark.parametrize("n,d", [(100, 10), (2000, 3), (700, 37), (256, 64), (300, 200), (900, 250), (2400, 140)])
def test_fused_step_by_the_median_rule_takes_median_bandwidths_h(n, d):
    """On the fused path (up to 256 features) the step's median is median_bandwidth's, bit for bit: both take
    the fused distances (by selection up to 128 particles, by the window beyond; 256 x 64 and 300 x 200 took
    the feature chunks before, 2400 x 140 the GEMM tiles, kept for K). fp64, so H is returned unrounded; phi
    as the float64 reference's."""
    torch.manual_seed(n + d)
    x, score = particles(n, d)
    h = torch.ops.bmt_fast.median_bandwidth(x, "tiled")
    by_rule = torch.ops.bmt_fast.svgd_step(x, score, None, "tiled")
    assert torch.equal(by_rule, torch.ops.bmt_fast.svgd_step(x, score, h, "tiled"))
    assert relative_error(by_rule, reference_phi(x, score)) < 1e-12


@requires_cpu_extension
@pytest.mark.parametrize("dtype,d", [(torch.float32, 1024), (torch.float32, 3072), (torch.float64, 512),
                                     (torch.float64, 1536)])
@pytest.mark.parametrize("bandwidth", [None, 5.0])
def test_sixteen_rows_4kib_apart_give_the_direct_apply_pass_bits(dtype, d, bandwidth):
    """16 particles whose rows are a multiple of 4 KiB apart take the Gram path's apply pass in two halves of
    the rows (csrc/cpu/kernels_impl_gram.h: apply_columns_halves); 16 zero columns more put the same particles on
    the direct pass, whose phi the halves must give bit for bit (on one thread, so that the Gram pass sums
    its column chunks in the same order; the zero chunk adds exact zeros). Its NaN flag as the direct pass's."""
    torch.manual_seed(d)
    x, score = particles(16, d, offset=3.0, dtype=dtype)
    pad = torch.zeros(16, 16, dtype=dtype)
    h = None if bandwidth is None else torch.tensor(bandwidth, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        phi = torch.ops.bmt_fast.svgd_step(x, score, h, "gram")
        padded = torch.ops.bmt_fast.svgd_step(torch.cat([x, pad], 1), torch.cat([score, pad], 1), h, "gram")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(phi, padded[:, :d])
    expected = reference_phi(x.double(), score.double(), bandwidth)
    assert relative_error(phi, expected) < (1e-5 if dtype == torch.float32 else 1e-12)
    out = torch.empty_like(x)
    for i, k in ((0, 0), (7, d // 2), (8, d // 3), (15, d - 1)):  # a row of each half
        bad = score.clone()
        bad[i, k] = math.nan
        assert not bool(torch.ops.bmt_fast.svgd_step_into(x, bad, h, "gram", out=out)), (i, k)
        assert torch.isnan(out[i, k])


@requires_cpu_extension
@pytest.mark.parametrize("n", [4, 12, 16, 24, 40])
def test_gram_path_flags_one_row_that_overflows_float16(n):
    """The Gram path's apply pass notes whether phi is finite a register block at a time (rows r % 4 in four
    parts; csrc/cpu/kernels_impl_io.h: track_finite_block, and the packed pass from 32 particles). One fp16
    particle 1e-5 from the others at H = 2e-10 (fp32 sums): its repulsion pushes its phi past 65504, everyone
    else's stays finite. Whichever row (each of a 4-, 12-, 16-row block and of the blocks of 24 and 40
    particles) and column (a whole vector or the ragged last one), the flag says so, and out holds Inf
    exactly there. (Only fp16 can overflow in one row alone: its range ends far below fp32's.)"""
    d = 19  # a whole vector of 16 fp32 lanes and a ragged one of 3
    h = torch.tensor(2e-10, dtype=torch.float64)
    score = torch.full((n, d), 6e4, dtype=torch.float16)
    out = torch.empty(n, d, dtype=torch.float16)
    for r in range(n):
        for c in (0, 17):
            x = torch.zeros(n, d, dtype=torch.float16)
            x[r, c] = 1e-5
            expected = reference_phi(x.double(), score.double(), h).abs() > 65520  # (rounds to Inf)
            assert expected[r, c] and int(expected.sum()) == 1, (r, c)  # the construction does what it says
            finite = torch.ops.bmt_fast.svgd_step_into(x, score, h, "gram", out=out)
            assert not bool(finite) and torch.equal(torch.isinf(out), expected), (r, c)
            finite = torch.ops.bmt_fast.svgd_step_into(x, score * 0, h, "gram", out=out)  # the push alone
            assert bool(finite) and bool(torch.isfinite(out).all()) and float(out[r, c]) > 4e4, (r, c)


@requires_cpu_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("precision", ["highest", "medium"])
def test_a_bandwidth_past_the_reciprocal_of_fp32s_least_value(dtype, precision):
    """A valid H so large that 1/H is 0 in fp32 (past 7.1e44: a float64 1e300): the fused and AMX paths had
    multiplied their padded rows' +inf norms by that 0 and returned phi all NaN; K is 1 to fp32's rounding, so
    phi is mean(score) (the reference's), on every path."""
    torch.manual_seed(3)
    for n, d in [(5, 3), (70, 37), (300, 20), (300, 64), (64, 2000)]:
        x, score = torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype)
        with float32_matmul_precision(precision):
            for h in (1e39, 1e50, 1e300):
                phi = bmt_fast.svgd_step(x, score, h, backend="cpu")
                expected = score.double().mean(0).expand(n, d).to(dtype)
                # (fp32 under "medium" on AMX: the scores' bf16 rounding)
                eps = torch.finfo(torch.bfloat16 if precision == "medium" else dtype).eps
                torch.testing.assert_close(phi, expected, rtol=0, atol=2 * max(eps, torch.finfo(dtype).eps),
                                           msg=f"{n} x {d}, H {h}")  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", *(["cpu"] if COMPILED_CPU else [])])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_particles_keep_fp32_arithmetic_under_autocast(backend, dtype):
    """torch.autocast made the torch backend's matmuls 16-bit (phi 3.8e-3 off under bf16, where the compiled
    backends, which autocast leaves alone, stay at 1e-7): fp32 particles accumulate in fp32 inside autocast too."""
    x, score = particles(40, 24, dtype=torch.float32)
    x64, s64 = x.double(), score.double()
    with torch.autocast("cpu", dtype=dtype):
        phi = bmt_fast.svgd_step(x, score, backend=backend)
        k = bmt_fast.rbf_kernel(x, None, 30.0, backend=backend)
        h = bmt_fast.median_bandwidth(x, backend=backend)
    assert phi.dtype == k.dtype == torch.float32
    assert relative_error(phi, reference.svgd_step(x64, s64, None)) < 1e-5
    assert relative_error(k, reference.rbf_kernel(x64, None, torch.tensor(30.0, dtype=torch.float64))) < 1e-5
    assert relative_error(h, reference.median_bandwidth(x64)) < 1e-5


@pytest.mark.parametrize("backend", ["torch", *(["cpu"] if COMPILED_CPU else [])])
def test_rbf_kernel_derivatives_keep_fp32_arithmetic_under_autocast(backend):
    """The differentiable formulas (double backward, forward mode, torch.func) had run 16-bit matmuls inside a
    caller's bf16 autocast: 2.4e-3 - 3.4e-3 off for fp32 particles, where the plain gradient was 1.7e-7."""
    x = particles(40, 24, dtype=torch.float32)[0]
    w = torch.randn(40, 40, dtype=torch.float64)
    h = torch.tensor(30.0, dtype=torch.float64)

    def loss(a, kernel):
        return (kernel(a, None, h if a.dtype == torch.float64 else h.float()) * w.to(a.dtype)).sum()

    ours = lambda a: loss(a, lambda *args: bmt_fast.rbf_kernel(*args, backend=backend))  # noqa: E731
    exact = lambda a: loss(a, reference.rbf_kernel)  # noqa: E731
    tangent = torch.randn_like(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hvp = torch.func.jvp(torch.func.grad(ours), (x,), (tangent,))[1]
        jvp = torch.func.jvp(ours, (x,), (tangent,))[1]
    expected_hvp = torch.func.jvp(torch.func.grad(exact), (x.double(),), (tangent.double(),))[1]
    expected_jvp = torch.func.jvp(exact, (x.double(),), (tangent.double(),))[1]
    assert relative_error(hvp, expected_hvp) < 1e-4 and relative_error(jvp, expected_jvp) < 1e-4
