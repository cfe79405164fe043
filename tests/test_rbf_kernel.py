"""rbf_kernel: values against the float64 reference, gradients, torch.library registration."""

import functools

import pytest
import torch
from helpers import (amx_shift, assert_within, float32_matmul_precision, relative_error, requires_amx, requires_cpu_extension,
                     run_cpu_variants, self_backward_expected, subprocess_env, torch_error_in)

import bmt_fast
from bmt_fast import reference


@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (5, 7, 3), (64, 33, 17), (130, 129, 300), (3, 4, 50_000)])
def test_values_fp64(cpu_backend, n, m, d):
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randn(m, d, dtype=torch.float64) + 0.5
    h = torch.tensor(float(d), dtype=torch.float64)
    k = bmt_fast.rbf_kernel(x, y, h, backend=cpu_backend)
    assert k.shape == (n, m) and k.dtype == torch.float64
    assert relative_error(k, reference.rbf_kernel(x, y, h)) < 1e-12


@pytest.mark.parametrize("n, m", [(1, 8), (3, 6), (30, 34)])
def test_two_sets_on_the_gram_path_strided(cpu_backend, n, m):
    """n + m <= 64: one Gram pass reads the rows of x, then those of y, without copying them together;
    strided views of both (made contiguous one by one) and a y far from x."""
    torch.manual_seed(n + m)
    x = torch.randn(3001, n, dtype=torch.float64).t()  # (n, 3001), column-major
    y = (torch.randn(m, 6002, dtype=torch.float64) + 0.25)[:, ::2]  # (m, 3001), every other column
    h = torch.tensor(2000.0, dtype=torch.float64)
    k = bmt_fast.rbf_kernel(x, y, h, backend=cpu_backend)
    assert relative_error(k, reference.rbf_kernel(x, y, h)) < 1e-12


@pytest.mark.parametrize("n, m, d", [(40, 30, 8), (20, 30, 8), (3, 5, 20_000)])  # tiled; Gram (n + m <= 64)
def test_values_fp32_far_from_origin(cpu_backend, n, m, d):
    x64 = (torch.randn(n, d, dtype=torch.float64) + 1e4).float().double()
    y64 = (torch.randn(m, d, dtype=torch.float64) + 1e4).float().double()
    h = torch.tensor(0.75 * d, dtype=torch.float64)
    k = bmt_fast.rbf_kernel(x64.float(), y64.float(), 0.75 * d, backend=cpu_backend)
    shift = x64[:1]
    torch_error = torch_error_in(torch.float32, lambda a, b: reference.rbf_kernel(a - shift.to(a.dtype), b - shift.to(a.dtype), h.to(a.dtype)), x64, y64)
    assert_within(k, reference.rbf_kernel(x64, y64, h), torch_error)


def test_y_none_is_the_self_kernel_with_unit_diagonal(cpu_backend):
    x = torch.randn(20, 6, dtype=torch.float64)
    k = bmt_fast.rbf_kernel(x, backend=cpu_backend)
    h = bmt_fast.median_bandwidth(x)
    assert relative_error(k, reference.rbf_kernel(x, None, h)) < 1e-12
    torch.testing.assert_close(k, k.T)
    assert torch.equal(k.diagonal(), torch.ones(20, dtype=torch.float64))


def test_median_bandwidth_of_the_reference_set(cpu_backend):
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.randn(50, 4, dtype=torch.float64) * 3
    k = bmt_fast.rbf_kernel(x, y, backend=cpu_backend)
    expected = reference.rbf_kernel(x, y, reference.median_bandwidth(y))
    assert relative_error(k, expected) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(cpu_backend, dtype):
    x, y = torch.randn(9, 5).to(dtype), torch.randn(11, 5).to(dtype)
    k = bmt_fast.rbf_kernel(x, y, 4.0, backend=cpu_backend)
    assert k.dtype == dtype
    expected = reference.rbf_kernel(x.double(), y.double(), torch.tensor(4.0, dtype=torch.float64))
    assert relative_error(k, expected) <= 2 * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10)


def amx_precision_kernel(x, y, h, dtype=torch.bfloat16):
    """rbf_kernel's arithmetic on AMX in torch: both sets shifted by amx_shift of all their rows (bf16 ones
    exactly; fp32 ones centred) and rounded to bf16, fp32 norms and dot products, K in fp32 (the diagonal of
    a self kernel (y None) exactly 1), rounded to dtype (the particles')."""
    rows = x if y is None else torch.cat([x, y])
    shift = amx_shift(rows)
    xb = (x.float() - shift).bfloat16().float()
    yb = xb if y is None else (y.float() - shift).bfloat16().float()
    nx, ny = (xb * xb).sum(1), (yb * yb).sum(1)
    k = torch.exp(-(nx[:, None] + ny[None] - 2 * xb @ yb.T).clamp_min(0) / h)
    if y is None:
        k.fill_diagonal_(1.0)
    return k.to(dtype)


@requires_amx
@pytest.mark.parametrize("n,m,d", [(65, None, 32), (300, None, 129), (513, None, 40), (129, None, 1024),
                                   (70, None, 20001), (200, 700, 33), (1000, 70, 64), (65, 65, 100),
                                   (256, None, 64), (100, 1024, 48), (1030, None, 256)])  # fmt: skip
@pytest.mark.parametrize("scale", ["median", "tiny"])
def test_bf16_kernel_on_amx_tiles(n, m, d, scale):
    """bf16 particles with many particles (n > 64 rows in all, d >= 32) on an AMX CPU: the step's K, with
    the tensor-core precision of the GPU kernels (bf16 operands, fp32 sums): within 2 ulps of bf16 of the
    float64 reference and every entry the documented arithmetic's (torch emulation) up to a last-bit flip;
    ragged blocks (128 rows, 512 columns, 32 features), two sets (one shift for both), a self kernel's
    diagonal exactly 1 (and, with an even n and d >= 256, its upper triangle by row blocks transposed
    below: K == K^T bit for bit; 1030 rows: 9 blocks, tiles right of and across the diagonal block), a
    bandwidth far below the distances (entries that underflow to 0), and rows of K that start on 64-byte
    lines or not (streamed or stored)."""
    torch.manual_seed(n + d)
    x = torch.randn(n, d).bfloat16()
    y = None if m is None else (torch.randn(m, d) + 0.3).bfloat16()
    other = x if y is None else y
    h = float(bmt_fast.median_bandwidth(x.double())) if scale == "median" else 1e-3 * d
    k = torch.ops.bmt_fast.rbf_kernel(x, other, torch.tensor(h, dtype=torch.float64))
    expected = reference.rbf_kernel(x.double(), other.double(), torch.tensor(h, dtype=torch.float64))
    assert k.shape == (n, other.shape[0]) and k.dtype == torch.bfloat16
    if scale == "median":
        assert relative_error(k, expected) <= 2 * 2.0**-8
    else:  # every entry off the diagonal is below bf16's smallest subnormal (9.2e-41): K is 0 there
        assert float(expected.abs().max() if y is not None else expected.fill_diagonal_(0).abs().max()) < 9e-41
    emulated = amx_precision_kernel(x, y, h).float()
    tolerance = 2.0**-7 * torch.maximum(k.float().abs(), emulated.abs())
    assert ((k.float() - emulated).abs() <= tolerance).all()
    if y is None:
        assert torch.equal(k.diagonal(), torch.ones(n, dtype=torch.bfloat16))
        if n % 2 == 0 and d >= 256:  # the upper triangle by row blocks, transposed below it: exactly symmetric
            assert torch.equal(k, k.T)
    if scale == "tiny":  # (the off-diagonal entries all underflow)
        assert int((k != 0).sum()) == (n if y is None else 0)


@requires_amx
def test_bf16_tight_clusters_far_apart_on_amx():
    """Two clusters 0.05 wide whose centres are drawn N(0, 10^2) per feature: the AMX operands had been the
    particles centred by their fp32 mean and rounded to bf16 again, which threw away their own low bits (K
    4.2e-2 and x's gradient 0.20 off).
    Shifted exactly (amx_shift), K is within 2 bf16 ulps and the gradient within 1e-2, as on Gaussian clouds."""
    torch.manual_seed(0)
    n, d = 256, 64
    centres = torch.randn(2, d, dtype=torch.float64) * 10
    x = (centres[torch.arange(n) % 2] + 0.05 * torch.randn(n, d, dtype=torch.float64)).bfloat16()
    x64 = x.double()
    d2 = torch.cdist(x64, x64).square()
    h = float(d2[0::2, 0::2].median())
    leaf = x.clone().requires_grad_(True)
    k = bmt_fast.rbf_kernel(leaf, None, h, backend="cpu")
    assert relative_error(k, torch.exp(-d2 / h)) <= 2 * 2.0**-8
    grad = torch.randn(n, n).bfloat16()
    (gx,) = torch.autograd.grad(k, leaf, grad)
    p = (grad.double() + grad.double().T) * k.detach().double()  # (the gradient of the K it returned)
    p.fill_diagonal_(0)
    assert relative_error(gx, (-2 / h) * (p.sum(1, keepdim=True) * x64 - p @ x64)) <= 1e-2


def amx_precision_gradients(grad, x, y, k, h):
    """rbf_kernel_backward's arithmetic on AMX in float64: both sets shifted as amx_precision_kernel's and
    rounded to bf16, P = grad * K rounded to bf16, its row and column sums, no rounding of the result."""
    rows = x if y is None else torch.cat([x, y])
    shift = amx_shift(rows)
    xb = (x.float() - shift).bfloat16().double()
    yb = xb if y is None else (y.float() - shift).bfloat16().double()
    p = (grad.float() * k.float()).bfloat16().double()
    if y is None:  # the own terms, P_ii (xc_i - xc_i) = 0, left out
        p.fill_diagonal_(0)
    scale = -2.0 / h
    return scale * (p.sum(1, keepdim=True) * xb - p @ yb), scale * (p.sum(0).unsqueeze(1) * yb - p.T @ xb)


@requires_amx
def test_amx_norms_are_not_biased():
    """The AMX path's norms (sums of the squares of the bf16-rounded particles) are summed in float64: in
    fp32 they came out low (the last bits of a bf16 square are rarely a half, so rounding them off into a
    large running sum rounds down more often than up), and the distances with them, on average 0.09 below
    the exact ones of the rounded particles at 70 x 20,001 (distances near 40,000). Recovered from an fp32
    K (each -H log K to ~1e-3) against float64 sums of the same rounded particles."""
    torch.manual_seed(5)
    n, d = 70, 20001
    x = torch.randn(n, d)
    h = 9000.0
    with float32_matmul_precision("medium"):
        k = torch.ops.bmt_fast.rbf_kernel(x, x, torch.tensor(h, dtype=torch.float64)).double()
    shift = x.double().mean(0, keepdim=True).float()
    xb = (x - shift).bfloat16().double()
    norms = (xb * xb).sum(1)
    exact = norms[:, None] + norms[None] - 2 * xb @ xb.T
    off = ~torch.eye(n, dtype=torch.bool)
    error = (-h * k.log() - exact)[off]
    assert abs(float(error.mean())) < 0.01 and float(error.abs().max()) < 0.05


@requires_amx
@pytest.mark.parametrize("n,m,d", [(300, None, 129), (513, None, 32), (200, 700, 33), (1000, 70, 64),
                                   (70, None, 20001), (129, 77, 1024), (1030, None, 256)])  # fmt: skip
def test_fp32_kernel_and_gradients_on_amx_where_torch_allows_bf16_matmuls(n, m, d):
    """fp32 particles with torch.set_float32_matmul_precision("medium") (fp32 matmuls may multiply bf16:
    ATen's own GEMMs do on this CPU) take the AMX path of bf16 particles in rbf_kernel and its gradient, with
    fp32 results: within 2 bf16 ulps of float64 and the documented arithmetic (bf16-rounded operands and P,
    fp32 sums) to fp32 rounding; a self kernel's diagonal exactly 1; the default precision ("highest") keeps
    IEEE fp32. Through autograd too (the public rbf_kernel's backward is the same op)."""
    torch.manual_seed(n + d)
    x = torch.randn(n, d)
    y = None if m is None else torch.randn(m, d) + 0.3
    other = x if y is None else y
    h = float(bmt_fast.median_bandwidth(x.double()))
    hh = torch.tensor(h, dtype=torch.float64)
    expected = reference.rbf_kernel(x.double(), other.double(), hh)
    ieee = torch.ops.bmt_fast.rbf_kernel(x, other, hh)
    grad = torch.randn(n, other.shape[0])
    with float32_matmul_precision("medium"):
        k = torch.ops.bmt_fast.rbf_kernel(x, other, hh)
        got = torch.ops.bmt_fast.rbf_kernel_backward(grad, x, other, k, torch.tensor(h), [True, True, True])
        leaf = x.clone().requires_grad_()
        (bmt_fast.rbf_kernel(leaf, None if y is None else y, h, backend="cpu") * grad).sum().backward()
    if y is None:  # the diagonal, exactly 1, apart: the errors are those of the entries off it
        assert torch.equal(k.diagonal(), torch.ones(n))
        if d >= 256:  # (one triangle, transposed)
            assert torch.equal(k, k.T)
    off = (lambda t: t.to(torch.float64, copy=True).fill_diagonal_(0)) if y is None else (lambda t: t)  # noqa: E731
    emulated_k = amx_precision_kernel(x, y, h, dtype=torch.float32)
    assert k.dtype == torch.float32 and relative_error(off(ieee), off(expected)) < 1e-5
    assert relative_error(off(k), off(expected)) <= 2 * 2.0**-8 and relative_error(off(k), off(ieee)) > 1e-5
    assert relative_error(off(k), off(emulated_k)) <= 1e-5
    p = grad.double() * k.double()
    if m is None:
        p.fill_diagonal_(0)
    expected_grads = (-2 / h * (p.sum(1, keepdim=True) * x.double() - p @ other.double()),
                      -2 / h * (p.sum(0).unsqueeze(1) * other.double() - p.T @ x.double()))  # fmt: skip
    emulated = amx_precision_gradients(grad, x, y, k, h)
    for g, want, emul in zip(got[:2], expected_grads, emulated):
        assert g.dtype == torch.float32 and relative_error(g, want) <= 2 * 2.0**-8
        assert relative_error(g, emul) <= 1e-5
    h_terms = float((p * k.double().clamp_min(torch.finfo(torch.float32).tiny).log()).abs().sum()) / h
    h_expected = -float((p * k.double().clamp_min(torch.finfo(torch.float32).tiny).log()).sum()) / h
    assert abs(float(got[2]) - h_expected) <= 1e-5 * h_terms
    if y is None:  # x on both sides: the two gradients' sum (70 x 20001: one pass, symmetrised weights)
        assert relative_error(leaf.grad, expected_grads[0] + expected_grads[1]) <= 2 * 2.0**-8
    else:  # (the public call's float H: within fp32 rounding of the op's)
        assert relative_error(leaf.grad, got[0]) <= 1e-5


@requires_amx
@pytest.mark.parametrize("n,m,d", [(300, None, 40), (200, 150, 64), (129, 77, 33), (100, 700, 96),
                                   (70, 600, 2001), (513, None, 32), (130, 700, 2050), (65, None, 700),
                                   (256, None, 4200), (270, None, 5200), (100, 120, 2001), (40, 120, 600)])  # fmt: skip
@pytest.mark.parametrize("scale", ["median", "tiny"])
def test_bf16_gradients_on_amx_tiles(n, m, d, scale):
    """rbf_kernel_backward of bf16 particles with many pairs (n m > 4096, d >= 32) on an AMX CPU: P = grad
    K and the particles rounded to bf16, fp32 sums. Against float64 on the same inputs (K as given): x's
    and y's gradients within 2 bf16 ulps of the largest, H's within 1e-4 of sum |P log K| / H; against the
    documented arithmetic (float64 emulation) within one rounding of the result and one of its fp32 sums.
    Ragged tiles (128 rows, 512 columns, 32 features), a self kernel (its own terms left out: with a tiny H
    they dwarfed a row's other terms in the sums), K entries that underflow to 0 (a tiny H: log K clamped,
    as the fp32 path), and d >= 2048 with at most 1024 rows on the other side (130 x 700 x 2050: the
    features a chunk at a time, the last one ragged), and few particles with many features (up to 512 on
    either side from 512 features at 128, n_pad^2 / 16 beyond: the feature-chunk pass, ragged last chunks,
    two sets too). Each gradient asked for alone is the full call's, bit for bit (H's: the same sum, in
    another order)."""
    torch.manual_seed(n + d)
    x = torch.randn(n, d).bfloat16()
    other = x if m is None else (torch.randn(m, d) + 0.3).bfloat16()
    if scale == "median":
        h = float(bmt_fast.median_bandwidth(x.double()))
    else:  # about half the distances beyond 87 H: K's fp32 exp gives 0 there
        h = float(torch.cdist(x.double(), other.double()).square().median()) / 87
    k = torch.ops.bmt_fast.rbf_kernel(x, other, torch.tensor(h))
    if scale == "tiny":
        assert 0.3 < float((k == 0).double().mean()) < 0.99
    grad = torch.randn_like(k)
    hh = torch.tensor(h)
    full = torch.ops.bmt_fast.rbf_kernel_backward(grad, x, other, k, hh, [True, True, True])
    p = grad.double() * k.double()
    log_k = k.double().clamp_min(torch.finfo(torch.float32).tiny).log()
    if m is None:  # (own terms: 0 exactly; in float64 sums next to P_ii ~ 1, terms of K ~ 1e-14 lose digits)
        p.fill_diagonal_(0)
    expected = (-2 / h * (p.sum(1, keepdim=True) * x.double() - p @ other.double()),
                -2 / h * (p.sum(0).unsqueeze(1) * other.double() - p.T @ x.double()))  # fmt: skip
    emulated = amx_precision_gradients(grad, x, None if m is None else other, k, h)
    for got, want, emul in zip(full[:2], expected, emulated):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape and bool(torch.isfinite(got).all())
        assert relative_error(got, want) <= 2 * 2.0**-8
        assert relative_error(got, emul) <= 2.0**-8
    h_expected = -float((p * log_k).sum()) / h
    h_terms = float((p * log_k).abs().sum()) / h
    assert full[2].dtype == torch.float32 and abs(float(full[2]) - h_expected) <= 1e-4 * h_terms
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        got = torch.ops.bmt_fast.rbf_kernel_backward(grad, x, other, k, hh, mask)
        for wanted, g, f in zip(mask[:2], got[:2], full[:2]):
            assert (g is None) != wanted and (not wanted or torch.equal(g, f))
        if mask[2]:
            assert abs(float(got[2]) - float(full[2])) <= 1e-5 * h_terms


@requires_amx
@pytest.mark.parametrize("n,d,dtype", [(33, 512, torch.bfloat16), (48, 1030, torch.bfloat16), (64, 3000, torch.float32),
                                       (32, 600, torch.bfloat16), (64, 500, torch.bfloat16)])  # fmt: skip
def test_self_kernel_gradient_of_33_or_more_particles_on_amx_chunks(n, d, dtype):
    """A self kernel's gradient with few pairs (n^2 <= 4096) goes by direct differences (fp32 arithmetic on
    the particles as given), except from 33 particles with 512 or more features on AMX (bf16, or fp32 under
    "medium"), where the forward takes the AMX feature chunks too: there it is the AMX arithmetic's (the
    float64 emulation of the rounded particles and P) entry by entry to fp32 sums, which the direct
    differences are not (the particles' bf16 rounding moves the entries that cancel). Through autograd
    (symmetrised weights) within 2 bf16 ulps of float64 either way."""
    torch.manual_seed(n + d)
    x = torch.randn(n, d).to(dtype)
    h = float(bmt_fast.median_bandwidth(x.double()))
    with float32_matmul_precision("medium"):
        k = torch.ops.bmt_fast.rbf_kernel(x, x, torch.tensor(h))
        grad = torch.randn(n, n).to(dtype)
        got = torch.ops.bmt_fast.rbf_kernel_backward(grad, x, x, k, torch.tensor(h), [True, False, False])[0]
        leaf = x.clone().requires_grad_()
        (bmt_fast.rbf_kernel(leaf, None, h, backend="cpu").float() * grad.float()).sum().backward()
    emulated = amx_precision_gradients(grad, x, None, k, h)[0]
    largest = float(emulated.abs().max())
    amx = n > 32 and d >= 512
    close = (got.double() - emulated).abs() <= 2.0**-8 * emulated.abs() + 1e-5 * largest
    assert bool(close.all()) == amx
    p = (grad.double() + grad.double().T) * k.double()
    p.fill_diagonal_(0)
    expected = -2 / h * (p.sum(1, keepdim=True) * x.double() - p @ x.double())
    assert leaf.grad.dtype == dtype and relative_error(leaf.grad, expected) <= 2 * 2.0**-8


def test_gradcheck_x_y_and_bandwidth(cpu_backend):
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    h = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: bmt_fast.rbf_kernel(a, b, c, backend=cpu_backend), (x, y, h))


def test_gradcheck_self_kernel(cpu_backend):
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: bmt_fast.rbf_kernel(a, None, 3.0, backend=cpu_backend), (x,))


@pytest.mark.parametrize("n", [3, 66])  # symmetrised self-kernel backward up to 64 particles, two outputs beyond
def test_double_backward(cpu_backend, n):
    """create_graph=True gives gradients that autograd differentiates again (the compiled backward op has
    no derivative: those gradients come from the differentiable formula reference.rbf_kernel_vjp, whose K
    is the forward's output, itself differentiable), in x, y and H."""
    x = torch.randn(n, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    h = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    # fast mode: a random projection of the Jacobians (the exact one perturbs every entry of the n x n
    # upstream gradient, minutes at n = 66)
    check = functools.partial(torch.autograd.gradgradcheck, fast_mode=True)
    assert check(lambda a, b, c: bmt_fast.rbf_kernel(a, b, c, backend=cpu_backend), (x, y, h))
    assert check(lambda a, c: bmt_fast.rbf_kernel(a, None, c, backend=cpu_backend), (x, h))


@requires_cpu_extension
def test_hessian_vector_product_of_the_median_kernel():
    """The median H is a constant of the gradient: so of its derivative too."""
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    weights, v = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    h = bmt_fast.median_bandwidth(x.detach())

    def hvp(kernel):
        (g,) = torch.autograd.grad((kernel(x) * weights).sum(), x, create_graph=True)
        return torch.autograd.grad((g * v).sum(), x)[0]

    torch.testing.assert_close(hvp(bmt_fast.rbf_kernel), hvp(lambda a: reference.rbf_kernel(a, None, h)))


def test_float_bandwidth_first_used_in_inference_mode(cpu_backend):
    """A float H is made into a tensor once and reused; one made in inference mode is an inference tensor,
    which autograd cannot save, so it must not serve a later differentiable call."""
    with torch.inference_mode():
        bmt_fast.rbf_kernel(torch.randn(4, 3), None, 0.625, backend=cpu_backend)
    x = torch.randn(4, 3, requires_grad=True)
    bmt_fast.rbf_kernel(x, None, 0.625, backend=cpu_backend).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_gradients_match_reference_autograd(cpu_backend):
    x = torch.randn(30, 10, dtype=torch.float64, requires_grad=True)
    y = torch.randn(20, 10, dtype=torch.float64, requires_grad=True)
    h = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(30, 20, dtype=torch.float64)
    grads = torch.autograd.grad((bmt_fast.rbf_kernel(x, y, h, backend=cpu_backend) * weights).sum(), (x, y, h))
    expected = torch.autograd.grad((reference.rbf_kernel(x, y, h) * weights).sum(), (x, y, h))
    for g, e in zip(grads, expected):
        assert relative_error(g, e) < 1e-10


@pytest.mark.parametrize("n, d", [(70, 280), (70, 63), (300, 1200), (70, 64), (2049, 16), (40, 7), (130, 4200)])
def test_self_kernel_gradient_is_one_call_of_the_self_backward_op(cpu_backend, n, d, monkeypatch):
    """A self kernel's backward is one call of rbf_kernel_self_backward (x's two gradients summed by the
    op), with H's gradient asked for: x's and H's gradients as the reference's autograd gives them. The
    CPU's paths: direct differences (40 x 7), the feature chunks (130 x 4200), the general path's blocks
    of symmetrised weights (70 x 63 ... 2049 x 16)."""
    torch.manual_seed(n + d)
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    h = torch.tensor(0.8 * d, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(n, n, dtype=torch.float64)
    calls = []
    self_backward, backward = torch.ops.bmt_fast.rbf_kernel_self_backward, torch.ops.bmt_fast.rbf_kernel_backward

    def recording(op, name):
        return lambda *args: calls.append((name, list(args[-1]))) or op(*args)

    monkeypatch.setattr(torch.ops.bmt_fast, "rbf_kernel_self_backward", recording(self_backward, "self"))
    monkeypatch.setattr(torch.ops.bmt_fast, "rbf_kernel_backward", recording(backward, "two sets"))
    grads = torch.autograd.grad((bmt_fast.rbf_kernel(x, None, h, backend=cpu_backend) * weights).sum(), (x, h))
    expected = torch.autograd.grad((reference.rbf_kernel(x, None, h) * weights).sum(), (x, h))
    for g, e in zip(grads, expected):
        assert relative_error(g, e) < 1e-10
    if cpu_backend == "cpu":
        assert calls == [("self", [True, True])]


@requires_cpu_extension
@pytest.mark.parametrize("n, d", [(3, 5), (64, 10), (65, 260), (65, 259), (200, 16), (300, 1), (100, 2100), (130, 4200), (1100, 33)])
@pytest.mark.parametrize("grad_kind", ["dense", "transposed", "ones", "row"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_self_backward_op_on_every_path_and_the_device_independent_rule(n, d, grad_kind, dtype):
    """rbf_kernel_self_backward(grad, x, K, H) = the float64 gradients of sum(grad * K(x, x)) in x (both
    sides) and H, on the CPU kernel's paths (direct differences up to 64 particles, and up to 128 with 2048 or more
    features, 100 x 2100; the feature chunks at 130 x 4200, the general path's blocks of grad + grad^T, several blocks at 1100 x 33) and in the rule
    that devices without their own kernel take (CompositeExplicitAutograd: grad + grad^T up to 64 particles
    or from 4 n features, 65 x 260; both of rbf_kernel_backward's gradients summed beyond, 65 x 259, 200 x
    16; the CPU's too for a dense grad with one feature, 300 x 1). Gradients of any layout: dense, a
    transposed view (read as its transpose), autograd's expanded ones of K.sum() (strides 0: x's gradient
    doubled), an expanded row (strides 0 and 1); each output alone is the pair's."""
    torch.manual_seed(n + d)
    x = torch.randn(n, d, dtype=dtype)
    h = torch.tensor(0.6 * d, dtype=dtype)
    k = torch.ops.bmt_fast.rbf_kernel(x, x, h)
    grad = {"dense": lambda: torch.randn(n, n, dtype=dtype), "transposed": lambda: torch.randn(n, n, dtype=dtype).T,
            "ones": lambda: torch.ones((), dtype=dtype).expand(n, n),
            "row": lambda: torch.randn(n, dtype=dtype).expand(n, n)}[grad_kind]()  # fmt: skip
    want_x, want_h = self_backward_expected(grad, x, h)
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    # H's gradient sums terms of both signs: its errors are relative to the sum of their sizes
    log_k = k.double().clamp_min(torch.finfo(dtype).tiny).log()
    h_terms = float(((grad.double().abs() + grad.double().abs().T) * k.double() * log_k.abs()).sum()) / float(h)
    op = torch.ops.bmt_fast.rbf_kernel_self_backward.default
    composite = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    for call in (op, functools.partial(op.redispatch, composite)):
        gx, gh = call(grad, x, k, h, [True, True])
        assert gx.dtype == dtype and gx.shape == x.shape and gh.dtype == dtype and gh.shape == h.shape
        assert relative_error(gx, want_x) < tol and abs(float(gh) - float(want_h)) <= tol * h_terms
        only_x, none = call(grad, x, k, h, [True, False])
        none_x, only_h = call(grad, x, k, h, [False, True])
        assert none is None and none_x is None
        # (H's: the same sum, in another order where x's gradient is not computed beside it)
        assert torch.equal(only_x, gx) and abs(float(only_h) - float(gh)) <= 8 * torch.finfo(dtype).eps * h_terms


@requires_cpu_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_self_backward_op_of_half_particles(dtype):
    """16-bit particles (the general path; bf16 on an AMX CPU: the AMX backward's two outputs): x's gradient
    in the particles' type within a few 16-bit roundings of float64 on the same inputs, H's too."""
    torch.manual_seed(7)
    x = torch.randn(300, 24).to(dtype)
    h = torch.tensor(20.0, dtype=dtype)
    k = torch.ops.bmt_fast.rbf_kernel(x, x, h)
    grad = torch.randn(300, 300).to(dtype)
    gx, gh = torch.ops.bmt_fast.rbf_kernel_self_backward(grad, x, k, h, [True, True])
    # float64 on the values the op was given (K as computed, not recomputed)
    p = ((grad.double() + grad.double().T) * k.double()).fill_diagonal_(0)
    want_x = -2 / float(h) * (p.sum(1, keepdim=True) * x.double() - p @ x.double())
    log_k = k.double().clamp_min(torch.finfo(torch.float32).tiny).log()
    want_h = -float((p * log_k).sum()) / 2 / float(h)
    h_terms = float((p * log_k).abs().sum()) / 2 / float(h)  # (terms of both signs: errors relative to these)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert gx.dtype == dtype and relative_error(gx.double(), want_x) < 4 * ulp
    assert gh.dtype == dtype and abs(float(gh) - want_h) <= 4 * ulp * h_terms


@pytest.mark.parametrize("n, m, d", [(7, 5, 300), (70, 60, 50), (6, None, 1000), (140, None, 4200),
                                     (130, 140, 4500)])  # fmt: skip
def test_fp32_gradients_far_from_origin(cpu_backend, n, m, d):
    """fp32 particles around 1e4 (the backward centres them): gradients within a few fp32 ulps of the fp64
    reference's, also for the self kernel, where x's gradient sums both of the op's outputs (Gram, tiled,
    self kernel; and the gradient's feature chunks: up to 512 rows a side from 4096 features, the last
    chunk ragged)."""
    torch.manual_seed(n)
    x64 = (torch.randn(n, d, dtype=torch.float64) + 1e4).float().double()
    y64 = None if m is None else (torch.randn(m, d, dtype=torch.float64) + 1e4).float().double()
    weights = torch.randn(n, n if m is None else m, dtype=torch.float64)

    def grads(x, y, kernel):
        h = torch.tensor(0.75 * d, dtype=x.dtype, requires_grad=True)
        leaves = [x.clone().requires_grad_()] + ([] if y is None else [y.clone().requires_grad_()])
        k = kernel(leaves[0], None if y is None else leaves[1], h)
        return torch.autograd.grad((k * weights.to(k.dtype)).sum(), leaves + [h])

    expected = grads(x64, y64, reference.rbf_kernel)
    got = grads(x64.float(), None if y64 is None else y64.float(),
                lambda a, b, h: bmt_fast.rbf_kernel(a, b, h, backend=cpu_backend))
    for g, e in zip(got, expected):  # x's, y's (if given) and H's
        assert g.dtype == torch.float32 and relative_error(g.double(), e) < 5e-6, relative_error(g.double(), e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_gradients(cpu_backend, dtype):
    """16-bit inputs: the backward widens K and the incoming gradient to fp32 before any product; with
    kernel values that underflow to 0 in the 16-bit type, every gradient stays finite and within a few
    16-bit roundings of the float64 reference on the same inputs."""
    torch.manual_seed(5)
    x = (torch.randn(70, 8, dtype=torch.float64) * 2.0).to(dtype)
    y = (torch.randn(50, 8, dtype=torch.float64) * 2.0).to(dtype)
    weights = torch.randn(70, 50, dtype=torch.float64)

    def grads(a, b, h0, kernel):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        h = torch.tensor(h0, dtype=a.dtype, requires_grad=True)
        k = kernel(a, b, h)
        return k, torch.autograd.grad((k * weights.to(k.dtype)).sum(), (a, b, h))

    k, got = grads(x, y, 1.5, lambda a, b, h: bmt_fast.rbf_kernel(a, b, h, backend=cpu_backend))
    assert bool((k == 0).any()) and k.dtype == dtype
    _, expected = grads(x.double(), y.double(), 1.5, reference.rbf_kernel)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for g, e in zip(got, expected):
        assert g.dtype == dtype and bool(torch.isfinite(g).all())
        assert relative_error(g.double(), e) < 8 * ulp, relative_error(g.double(), e)


@requires_cpu_extension
# direct; GEMM form; the general path's blocks of rows; by chunks
@pytest.mark.parametrize("n, m, d", [(1, 16, 300), (40, 30, 20), (200, 150, 20), (140, 130, 4100)])
def test_backward_computes_only_the_requested_gradients(n, m, d):
    """output_mask: the op leaves out (None) what autograd does not need (the trainer's prior: one
    prompt, constant particles, a constant H), and what it computes equals the full call's."""
    torch.manual_seed(n + m)
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randn(m, d, dtype=torch.float64) + 0.3
    h = torch.tensor(0.8 * d, dtype=torch.float64)
    k = torch.ops.bmt_fast.rbf_kernel(x, y, h)
    grad = torch.randn(n, m, dtype=torch.float64)
    full = torch.ops.bmt_fast.rbf_kernel_backward(grad, x, y, k, h, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [True, False, True]):
        got = torch.ops.bmt_fast.rbf_kernel_backward(grad, x, y, k, h, mask)
        for wanted, g, f in zip(mask, got, full):
            assert (g is None) != wanted
            if wanted:
                torch.testing.assert_close(g, f, rtol=1e-13, atol=0)
    leaf = x.clone().requires_grad_()
    (g,) = torch.autograd.grad((bmt_fast.rbf_kernel(leaf, y, h, backend="cpu") * grad).sum(), leaf)
    expected_leaf = x.clone().requires_grad_()
    (e,) = torch.autograd.grad((reference.rbf_kernel(expected_leaf, y, h) * grad).sum(), expected_leaf)
    assert relative_error(g, e) < 1e-10


# (n, m, d, op, self kernel, direct differences?) on both sides of each bound of the CPU's direct rules
DIRECT_RULE_CASES = [
    (32, 32, 2, "rbf_kernel", False, True), (33, 32, 2, "rbf_kernel", False, False),  # 1024 pairs
    (64, 64, 511, "rbf_kernel", False, False), (64, 64, 512, "rbf_kernel", False, True),  # 8 per row, 4096 pairs
    (4, 1024, 31, "rbf_kernel", False, False), (4, 1024, 32, "rbf_kernel", False, True),
    (4, 4097, 127, "rbf_kernel", False, False), (4, 4097, 128, "rbf_kernel", False, True),  # beyond: 32 per row
    (1, 9000, 63, "rbf_kernel", False, False), (9000, 1, 64, "rbf_kernel", False, True),  # and at least 64
    (100, 200, 3199, "rbf_kernel", False, False), (100, 200, 3200, "rbf_kernel", False, True),
    (1024, 1025, 32_800, "rbf_kernel", False, False),  # more than 2^20 pairs
    (16, 16, 100, "rbf_kernel", True, False),  # a self kernel never
    (64, 64, 2, "rbf_kernel_backward", False, True), (65, 64, 63, "rbf_kernel_backward", False, False),  # 4096
    (65, 64, 64, "rbf_kernel_backward", False, True), (128, 128, 64, "rbf_kernel_backward", False, True),  # 16,384
    (129, 128, 64, "rbf_kernel_backward", False, False), (129, 128, 4096, "rbf_kernel_backward", False, True),
    (2, 8193, 63, "rbf_kernel_backward", False, False), (2, 8193, 64, "rbf_kernel_backward", False, True),
    (8, 3000, 255, "rbf_kernel_backward", False, False), (8, 3000, 256, "rbf_kernel_backward", False, True),
    (1025, 1024, 32_800, "rbf_kernel_backward", False, False),
    (64, 64, 2, "rbf_kernel_backward", True, True), (65, 65, 2047, "rbf_kernel_backward", True, False),
    (65, 65, 2048, "rbf_kernel_backward", True, True), (128, 128, 2048, "rbf_kernel_backward", True, True),
    (129, 129, 5000, "rbf_kernel_backward", True, False),  # a self kernel: not beyond 16,384 pairs
]


@requires_cpu_extension
@pytest.mark.parametrize("n, m, d, op, self_kernel, direct", DIRECT_RULE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direct_rules_pick_the_measured_side_of_each_bound(n, m, d, op, self_kernel, direct, dtype):
    """Where the CPU takes direct differences of the rows for rbf_kernel of two sets and for the gradients
    (two sets or a self kernel): the bounds that the sweeps in csrc/cpu/gram.cpp (direct_cross_kernel) and
    csrc/cpu/rbf_backward.cpp (direct_gradient) measured, each on both sides; the same rule in fp32 and fp64."""
    module = bmt_fast._extension.CPU.module
    x = torch.empty(n, d, dtype=dtype)  # (shapes only: nothing is computed)
    y = x if self_kernel else torch.empty(m, d, dtype=dtype)
    assert module.takes_direct_path(x, y, op) == direct


@requires_cpu_extension
def test_takes_direct_path_refuses_unknown_ops_and_shapes():
    module = bmt_fast._extension.CPU.module
    with pytest.raises(RuntimeError, match="op must be"):
        module.takes_direct_path(torch.randn(4, 3), torch.randn(5, 3), "svgd_step")
    with pytest.raises(RuntimeError, match="same number of columns"):
        module.takes_direct_path(torch.randn(4, 3), torch.randn(5, 2), "rbf_kernel")


@requires_cpu_extension
# direct differences up to 1024 pairs, up to 4096 with 8 features per row of the smaller set, beyond with 32
# and at least 64; GEMM tiles of the centred sets otherwise (64 x 64 x 2, 16 x 256 x 127, 4 x 1024 x 31, 16 x
# 1024 x 511, 100 x 200 x 3199, 4 x 4097 x 127, 1 x 9000 x 63)
@pytest.mark.parametrize("n, m, d", [(32, 32, 2), (64, 64, 2), (64, 64, 512), (16, 256, 127), (16, 256, 128),
                                     (4, 1024, 31), (4, 1024, 32), (1, 4096, 3), (16, 1024, 511), (16, 1024, 512),
                                     (100, 200, 3199), (100, 200, 3200), (4, 4097, 127), (4, 4097, 128),
                                     (1, 9000, 63), (9000, 1, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_set_kernel_on_both_sides_of_the_direct_rule(n, m, d, dtype):
    """rbf_kernel of two sets of particles near a common offset (1e3, spread 1) against the float64
    reference, on either side of the rule that picks direct differences (exact differences, a double exp
    per pair) or the GEMM of the centred sets."""
    torch.manual_seed(n * m + d)
    x = (torch.randn(n, d, dtype=torch.float64) + 1e3).to(dtype)
    y = (torch.randn(m, d, dtype=torch.float64) + 1e3).to(dtype)
    h = torch.tensor(2.0 * d, dtype=torch.float64)
    k = torch.ops.bmt_fast.rbf_kernel(x, y, h)
    assert k.shape == (n, m) and k.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    assert relative_error(k, reference.rbf_kernel(x.double(), y.double(), h)) < tol


@requires_cpu_extension
@pytest.mark.parametrize("n, m, d", [(1, 1, 1), (1, 16, 37), (3, 5, 20_011), (64, 64, 70), (41, 100, 70),
                                     (6, 700, 45), (7, 300, 3), (100, 150, 63), (100, 150, 64), (2, 8193, 63),
                                     (2, 8193, 64), (8, 3000, 255), (8, 3000, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_by_direct_differences(n, m, d, dtype):
    """Few pairs (n * m <= 4096, or up to 16,384 with 64 or more features, or beyond with 32 features per row
    of the smaller set and at least 64): the row gradients by direct differences over column blocks split
    across threads (ragged last vectors, d < one vector, register blocks of fewer rows than a full block: 6 =
    4 + 2, 7 = 4 + 2 + 1; both sides of the 4096-pair switch, of the 64 features at 100 x 150 and 2 x 8193, of
    32 features a row at 8 x 3000), and the blocked path beside them, far from the origin in fp32: within a few
    ulps of the float64 reference on the same inputs."""
    torch.manual_seed(d)
    offset = 1e4 if dtype == torch.float32 else 0.0
    x64 = (torch.randn(n, d, dtype=torch.float64) + offset).to(dtype).double()
    y64 = (torch.randn(m, d, dtype=torch.float64) + offset).to(dtype).double()
    weights = torch.randn(n, m, dtype=torch.float64)

    def grads(x, y, kernel):
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        h = torch.tensor(0.9 * d, dtype=x.dtype, requires_grad=True)
        return torch.autograd.grad((kernel(a, b, h) * weights.to(x.dtype)).sum(), (a, b, h))

    expected = grads(x64, y64, reference.rbf_kernel)
    got = grads(x64.to(dtype), y64.to(dtype), lambda a, b, h: bmt_fast.rbf_kernel(a, b, h, backend="cpu"))
    tol = 5e-6 if dtype == torch.float32 else 1e-11
    for g, e in zip(got, expected):
        assert g.dtype == dtype and relative_error(g.double(), e) < tol, relative_error(g.double(), e)


@requires_cpu_extension
@pytest.mark.parametrize("isa", ["base", "v3", "v4"])
def test_direct_difference_kernels_in_every_isa_build(isa, tmp_path):
    """The baseline, AVX2 and AVX-512 builds of the direct-difference kernels (two-set distances and the
    row gradients: register blocks of 8 or 4 rows, then of 4, 2 and 1, ragged last vectors) against the
    float64 reference, in each input dtype."""
    import subprocess
    import sys

    script = tmp_path / "check.py"
    script.write_text(
        "import torch, bmt_fast\n"
        "from bmt_fast import reference\n"
        "torch.manual_seed(0)\n"
        "tol = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}\n"
        "for n, m, d in [(1, 16, 77), (9, 13, 1030), (17, 3, 5), (6, 7, 33), (7, 6, 19)]:\n"
        "    for dt in tol:\n"
        "        x = torch.randn(n, d, dtype=torch.float64).to(dt); y = torch.randn(m, d, dtype=torch.float64).to(dt)\n"
        "        h = torch.tensor(1.5 * d, dtype=torch.float64 if dt == torch.float64 else torch.float32)\n"
        "        g = torch.randn(n, m, dtype=torch.float64)\n"
        "        k = torch.ops.bmt_fast.rbf_kernel(x, y, h)\n"
        "        xs, ys, hs = x.double().requires_grad_(), y.double().requires_grad_(), h.double().requires_grad_()\n"
        "        ref = reference.rbf_kernel(xs, ys, hs)\n"
        "        assert float((k.double() - ref).abs().max() / ref.abs().max()) < tol[dt], (n, m, d, dt)\n"
        "        expected = torch.autograd.grad((ref * g).sum(), (xs, ys, hs))\n"
        "        got = torch.ops.bmt_fast.rbf_kernel_backward(g.to(dt), x, y, k, h, [True, True, True])\n"
        "        for a, b in zip(got, expected):\n"
        "            assert float((a.double() - b).abs().max() / b.abs().max()) < 4 * tol[dt], (n, m, d, dt)\n"
        "print(bmt_fast._extension.CPU.module.build_info()['cpu_isa'])\n"
    )
    result = subprocess.run([sys.executable, str(script)], env=subprocess_env(BMT_FAST_CPU_ISA=isa),
                            capture_output=True, text=True)
    if "lacks the instructions" in result.stderr:
        pytest.skip(f"this CPU cannot run the {isa} build")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == isa


@requires_cpu_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gradients_by_direct_differences(dtype):
    """16-bit rows: differences and sums in fp32, each gradient rounded once to the input's type."""
    torch.manual_seed(11)
    x, y = torch.randn(2, 301).to(dtype), torch.randn(9, 301).to(dtype)
    weights = torch.randn(2, 9, dtype=torch.float64)

    def grads(a, b, kernel):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        return torch.autograd.grad((kernel(a, b, torch.tensor(250.0, dtype=a.dtype)) * weights.to(a.dtype)).sum(), (a, b))

    got = grads(x, y, lambda a, b, h: bmt_fast.rbf_kernel(a, b, h, backend="cpu"))
    expected = grads(x.double(), y.double(), reference.rbf_kernel)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for g, e in zip(got, expected):
        assert g.dtype == dtype and relative_error(g.double(), e) < 8 * ulp, relative_error(g.double(), e)


@pytest.mark.parametrize("m", [None, 40])
def test_bandwidth_gradient_with_underflowing_kernel_values(cpu_backend, m):
    """dL/dH = sum grad * K * D / H^2, taken from the gradients' own products (no pass over log K): pairs
    whose K underflows to 0 contribute nothing, as in autograd of the reference."""
    torch.manual_seed(3)
    x = torch.randn(90, 6, dtype=torch.float64) * 2.0
    y = None if m is None else torch.randn(m, 6, dtype=torch.float64) * 2.0
    weights = torch.randn(90, 90 if m is None else m, dtype=torch.float64)
    h = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)  # about half the K_ij == 0 exactly
    k = bmt_fast.rbf_kernel(x, y, h, backend=cpu_backend)
    assert 0.3 < float((k == 0).double().mean()) < 0.9
    got = torch.autograd.grad((k * weights).sum(), h)[0]
    expected = torch.autograd.grad((reference.rbf_kernel(x, y, h) * weights).sum(), h)[0]
    assert relative_error(got, expected) < 1e-10


@requires_cpu_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_self_kernel_gradients_with_tiny_kernel_values(dtype):
    """A self kernel's own terms P_ii (x_i - x_i) are 0 and left out of the GEMM form's sums (many pairs):
    with a small H, K_ii = 1 sat beside K_ij ~ 1e-14 in rowsum(P) and P x, and their difference lost every
    other term (fp32: gradients of 5e-7 where they are 7e-14)."""
    torch.manual_seed(4)
    x = torch.randn(300, 40, dtype=torch.float64).to(dtype)
    h = torch.tensor(float(torch.cdist(x.double(), x.double()).square().median()) / 87, dtype=dtype)
    k = torch.ops.bmt_fast.rbf_kernel(x, x, h)
    grad = torch.randn_like(k)
    gx, gy, _ = torch.ops.bmt_fast.rbf_kernel_backward(grad, x, x, k, h, [True, True, False])
    p = (grad.double() * k.double()).fill_diagonal_(0)
    x64 = x.double()
    expected_x = -2 / float(h) * (p.sum(1, keepdim=True) * x64 - p @ x64)
    expected_y = -2 / float(h) * (p.sum(0).unsqueeze(1) * x64 - p.T @ x64)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert relative_error(gx, expected_x) < tol and relative_error(gy, expected_y) < tol
    leaf = x.clone().requires_grad_(True)  # through autograd (y=None): the sum of both
    (g,) = torch.autograd.grad((bmt_fast.rbf_kernel(leaf, None, h, backend="cpu") * grad).sum(), (leaf,))
    assert relative_error(g, expected_x + expected_y) < tol


def test_kde_log_prior_decreases_away_from_particles(cpu_backend):
    """The use in the trainer: -log mean_m k(theta, theta_m) pulls theta towards the particles."""
    particles = torch.randn(8, 16, dtype=torch.float64)
    theta = (particles.mean(0, keepdim=True) + 3.0).requires_grad_(True)
    h = bmt_fast.median_bandwidth(particles)
    opt = torch.optim.SGD([theta], lr=0.5)
    losses = []
    for _ in range(30):
        loss = -bmt_fast.rbf_kernel(theta, particles, h, backend=cpu_backend).mean().log()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 1.0


@requires_cpu_extension
def test_opcheck_rbf_kernel_ops():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    h = torch.tensor(2.0, dtype=torch.float64)
    torch.library.opcheck(torch.ops.bmt_fast.rbf_kernel.default, (x, y, h))
    k = torch.ops.bmt_fast.rbf_kernel(x.detach(), y.detach(), h)
    grad = torch.randn(5, 4, dtype=torch.float64)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(torch.ops.bmt_fast.rbf_kernel_backward.default, (grad, x.detach(), y.detach(), k, h, mask))
    k_self = torch.ops.bmt_fast.rbf_kernel(x.detach(), x.detach(), h)
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(torch.ops.bmt_fast.rbf_kernel_self_backward.default,
                              (torch.randn(5, 5, dtype=torch.float64), x.detach(), k_self, h, mask))


@requires_cpu_extension
@pytest.mark.parametrize("n", [1, 5, 16, 64, 65, 130])  # one Gram pass; fp32 130: the two ops
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rbf_kernel_median_op_equals_the_two_ops(n, dtype):
    """rbf_kernel_median(x) = (rbf_kernel(x, x, H), H) with H = median_bandwidth(x): the same values, bit
    for bit, whether one Gram pass gave both (on the CPU where both ops take the Gram path: here up to 130
    particles, but 130 in fp32 and 16-bit, whose rbf_kernel takes the fused kernel) or the two ops ran."""
    x = (torch.randn(n, 2001, dtype=torch.float64) + 3.0).to(dtype)
    k, h = torch.ops.bmt_fast.rbf_kernel_median(x)
    h2 = torch.ops.bmt_fast.median_bandwidth(x)
    assert torch.equal(h, h2) and h.dtype == h2.dtype
    assert torch.equal(k, torch.ops.bmt_fast.rbf_kernel(x, x, h2)) and k.dtype == dtype
    assert torch.equal(bmt_fast.rbf_kernel(x, backend="cpu"), k)  # the public call takes this op
    meta_k, meta_h = torch.ops.bmt_fast.rbf_kernel_median(x.to("meta"))
    assert meta_k.shape == (n, n) and meta_k.dtype == dtype and meta_h.shape == () and meta_h.dtype == h.dtype


@requires_cpu_extension
@pytest.mark.parametrize("n,d,dtype", [(1600, 512, torch.float64), (1030, 4100, torch.float32)])
def test_self_kernel_from_the_upper_tiles_on_the_gemm_path(n, d, dtype):
    """rbf_kernel(x) of many particles with many features computes only the GEMM tiles of the upper
    triangle (512 x 512, ragged at the edge) and writes each a second time, transposed, below it: K exactly
    symmetric with a diagonal of 1, against the float64 reference; rbf_kernel_median then forms K from the
    median pass's kept tiles, bit for bit the two ops'."""
    torch.manual_seed(n)
    x = torch.randn(n, d, dtype=torch.float64).to(dtype)
    h = torch.tensor(1.5 * d, dtype=torch.float64)
    k = torch.ops.bmt_fast.rbf_kernel(x, x, h)
    assert torch.equal(k, k.T) and torch.equal(k.diagonal(), torch.ones(n, dtype=dtype))
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    assert relative_error(k, reference.rbf_kernel(x.double(), x.double(), h)) < tolerance
    k_median, h_median = torch.ops.bmt_fast.rbf_kernel_median(x)
    assert torch.equal(h_median, torch.ops.bmt_fast.median_bandwidth(x))
    assert torch.equal(k_median, torch.ops.bmt_fast.rbf_kernel(x, x, h_median))


@requires_amx
@pytest.mark.parametrize("n,d,dtype", [(131, 600, torch.float32), (700, 520, torch.float32), (130, 2001, torch.bfloat16),
                                       (131, 2001, torch.bfloat16)])  # fmt: skip
def test_rbf_kernel_median_on_amx_from_the_median_pass_dot_products(n, d, dtype):
    """On AMX with d >= 512 rbf_kernel_median forms K from the dot products the median's pass kept (where
    rbf_kernel takes its one triangle: fp32, or bf16 with an even n; an odd n of bf16 runs the two ops):
    still rbf_kernel(x, x, median_bandwidth(x)) bit for bit (fp32 under "medium", so on AMX too)."""
    torch.manual_seed(n + d)
    x = (torch.randn(n, d, dtype=torch.float64) + 1.0).to(dtype)
    with float32_matmul_precision("medium"):
        k, h = torch.ops.bmt_fast.rbf_kernel_median(x)
        assert torch.equal(k, torch.ops.bmt_fast.rbf_kernel(x, x, torch.ops.bmt_fast.median_bandwidth(x)))
    assert torch.equal(k.diagonal(), torch.ones(n, dtype=dtype)) and torch.equal(k, k.T)
    assert relative_error(k, reference.rbf_kernel(x.double(), x.double(), h.double())) <= 2 * 2.0**-8


@requires_cpu_extension
@pytest.mark.parametrize("n, d", [(6, 40), (64, 300), (70, 5)])  # symmetrised backward up to 64, two outputs beyond
def test_gradient_of_the_median_kernel_treats_the_bandwidth_as_a_constant(n, d):
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(n, n, dtype=torch.float64)
    (grad,) = torch.autograd.grad((bmt_fast.rbf_kernel(x) * weights).sum(), x)
    h = bmt_fast.median_bandwidth(x.detach())
    (given,) = torch.autograd.grad((bmt_fast.rbf_kernel(x, bandwidth=h) * weights).sum(), x)
    assert torch.equal(grad, given)
    x_ref = x.detach().clone().requires_grad_(True)
    (reference.rbf_kernel(x_ref, None, h) * weights).sum().backward()
    assert relative_error(grad, x_ref.grad) < 1e-12
    k, h_out = torch.ops.bmt_fast.rbf_kernel_median(x)
    assert k.requires_grad and not h_out.requires_grad
    torch.library.opcheck(torch.ops.bmt_fast.rbf_kernel_median.default, (x,))


@requires_cpu_extension
def test_torch_compile_traces_a_float_bandwidth():
    """A float H becomes a constant of the graph (eagerly, a cached tensor: dynamo traces neither the cache
    nor the inference-mode query it is keyed on)."""

    def loss(x, y):
        return bmt_fast.rbf_kernel(x, y, 2.0, backend="cpu", check_inputs=False).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, dtype=torch.float64)
    compiled(x, y).backward()
    expected_x = x.detach().clone().requires_grad_(True)
    loss(expected_x, y).backward()
    torch.testing.assert_close(x.grad, expected_x.grad)


@requires_cpu_extension
def test_torch_compile_traces_the_ops():
    def loss(x, y, h):
        return bmt_fast.rbf_kernel(x, y, h, backend="cpu", check_inputs=False).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=True)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 3, dtype=torch.float64)
    h = torch.tensor(2.0, dtype=torch.float64)
    out = compiled(x, y, h)
    out.backward()
    expected_x = x.detach().clone().requires_grad_(True)
    reference.rbf_kernel(expected_x, y, h).sum().backward()
    torch.testing.assert_close(out, reference.rbf_kernel(x.detach(), y, h).sum())
    torch.testing.assert_close(x.grad, expected_x.grad)


FUSED_KERNEL_SCRIPT = """
import sys, torch, bmt_fast
torch.manual_seed(0)
out = {}
# (n, d, dtype): rbf_kernel(x) by the fused distances up to 256 features: both triangles by 4-row blocks
# (ragged) below 512 particles (1024 under 64 features), the upper triangle by 64-row blocks beyond (512 x 64
# at the bound, an even and an odd count of blocks, ragged last blocks, fp64 at 900 x 250, several tiles per
# block at 3000 x 100 and 1300 x 160); the median by selection (n <= 128) and by the window beyond, also
# from 128 features (300 x 200, 900 x 250, 1300 x 160); 16-bit particles' K written in their dtype from the
# buffered upper triangle at any n (90 x 20 bf16, 600 x 40 fp16); with BMT_FAST_CPU_FUSED=0, 70 x 37 fp64 takes
# the one-GEMM path, whose BLAS need not round x_i . x_j and x_j . x_i alike (an AMD EPYC's did not).
for n, d, dtype in [(70, 5, torch.float32), (257, 64, torch.float32), (300, 200, torch.float64),
                    (130, 256, torch.float32), (1100, 30, torch.float32), (900, 250, torch.float64),
                    (90, 20, torch.bfloat16), (3000, 100, torch.float32), (512, 64, torch.float32),
                    (1300, 160, torch.float32), (600, 40, torch.float16), (70, 37, torch.float64)]:
    x = (torch.randn(n, d, dtype=torch.float64) * 1.5 + 2.0).to(dtype)
    h = torch.tensor(2.0 * d, dtype=torch.float64)
    k_median, h_median = torch.ops.bmt_fast.rbf_kernel_median(x)
    out[(n, d, str(dtype))] = {"x": x, "k": torch.ops.bmt_fast.rbf_kernel(x, x, h), "h": h,
                               "median_bandwidth": torch.ops.bmt_fast.median_bandwidth(x, "auto"),
                               "k_median": k_median, "h_median": h_median,
                               "k_of_h_median": torch.ops.bmt_fast.rbf_kernel(x, x, h_median)}
torch.save(out, sys.argv[1])
"""


@requires_cpu_extension
def test_self_kernel_by_the_fused_distances_in_one_team(tmp_path):
    """rbf_kernel(x) with up to 256 features takes the fused distances, its loops in one OpenMP region
    (team.h), from 512 particles its upper triangle alone: the float64 reference's K, exactly symmetric
    with a unit diagonal;
    rbf_kernel_median gives rbf_kernel(x, x, H) with H = median_bandwidth(x), bit for bit, both from one
    team. With every call threaded the results are the same bits (each entry's arithmetic does not depend
    on the split); with BMT_FAST_CPU_FUSED=0 (one GEMM, feature chunks, GEMM-tile medians) the same values
    within rounding."""
    variants = {"fused": {}, "threaded": {"BMT_FAST_CPU_SERIAL_MAX_WORK": "0"}, "gemm": {"BMT_FAST_CPU_FUSED": "0"}}
    results = run_cpu_variants(tmp_path, FUSED_KERNEL_SCRIPT, variants)
    assert len(results["fused"]) == 12
    for key, fused in results["fused"].items():
        n, d, dtype = key
        tol = {"torch.float32": 2e-5, "torch.float64": 1e-12, "torch.bfloat16": 1e-2, "torch.float16": 2e-3}[dtype]
        x64 = fused["x"].double()
        expected = reference.rbf_kernel(x64, x64, fused["h"])
        for name, result in results.items():
            k = result[key]["k"]
            assert k.dtype == fused["x"].dtype and k.shape == (n, n), (key, name)
            assert torch.equal(k, k.T) and torch.equal(k.diagonal(), torch.ones(n, dtype=k.dtype)), (key, name)
            assert relative_error(k, expected) <= tol, (key, name)
            assert torch.equal(result[key]["h_median"], result[key]["median_bandwidth"]), (key, name)
            assert torch.equal(result[key]["k_median"], result[key]["k_of_h_median"]), (key, name)
            h_ref = float(reference.median_bandwidth(x64))
            assert abs(float(result[key]["h_median"]) / h_ref - 1) <= tol, (key, name)
        for name in ("k", "h_median", "k_median"):
            assert torch.equal(fused[name], results["threaded"][key][name]), (key, name)


@requires_cpu_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, d", [(16, 3), (255, 2), (600, 8), (2048, 16)])
def test_the_gradient_at_identical_particles_is_zero(n, d, dtype):
    """Every particle the same point: every x_i - x_j is 0, so x's and y's gradients are exactly 0 whatever H and
    the incoming gradient (autograd of the reference gives 0). The backward's general path had centred by the
    mean, which for n equal values is not always that value: fp32, 2048 x 16 of 1000.1 at the median rule's floor
    H, a gradient of 6.9e4 (fp64: 8e-14); it centres as the forward does now (x_0 + mean(x - x_0))."""
    generator = torch.Generator().manual_seed(n + d)
    for value in (0.1, 0.3, 1000.1):
        x = torch.full((n, d), value, dtype=dtype, requires_grad=True)
        k = bmt_fast.rbf_kernel(x, None, "median", backend="cpu")  # H at its floor, K all ones
        (grad,) = torch.autograd.grad(k, x, torch.randn(n, n, dtype=dtype, generator=generator))
        assert not grad.any(), (value, float(grad.abs().max()))
        y = torch.full((7, d), value, dtype=dtype, requires_grad=True)
        k = bmt_fast.rbf_kernel(x, y, 1e-12, backend="cpu")
        grad_x, grad_y = torch.autograd.grad(k, (x, y), torch.randn(n, 7, dtype=dtype, generator=generator))
        assert not grad_x.any() and not grad_y.any(), (value, float(grad_x.abs().max()), float(grad_y.abs().max()))


def test_auto_chooses_by_the_larger_of_x_and_y(monkeypatch):
    """backend="auto" for rbf_kernel(x, y) goes by the larger row count of the two: the CUDA rule's Triton
    limits (32-bit offsets: n * n and n * d below 2^31) then hold for K = n x m (by x alone it had picked
    Triton for 32,768 x 65,537, which Triton refuses). The CUDA rule is tried here on CPU tensors, its
    'triton' standing for 'torch' and its 'cuda' for 'cpu'."""
    from bmt_fast import backends
    from bmt_fast.triton_backend import cuda_auto_rule

    stand_in = {"triton": "torch", "cuda": "cpu", "torch": "torch"}
    monkeypatch.setitem(backends._AUTO_RULES, "cpu", lambda op, n, d, dtype: [stand_in[b] for b in cuda_auto_rule(op, n, d, dtype)])
    backends._SELECTED.clear()
    try:
        x, y = torch.empty(32768, 1), torch.empty(65537, 1)
        expected = "torch" if backends.get("cpu").unavailable_reason() else "cpu"
        assert backends.select_rbf_kernel("auto", x, y).name == expected
        assert backends.select_rbf_kernel("auto", y, x).name == expected
        assert backends.select_rbf_kernel("auto", x, None).name == "torch"  # (Triton first there: 32,768 x 1)
        # the public op takes that choice (its gradient: the reference's)
        calls = []
        torch_backend = backends.get("torch")
        for name in ("rbf_kernel", "rbf_kernel_vjp"):
            real = getattr(torch_backend, name)
            monkeypatch.setattr(torch_backend, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
        monkeypatch.setitem(backends._AUTO_RULES, "cpu", lambda op, n, d, dtype: ["torch"] if n >= 10 else ["cpu"])
        backends._SELECTED.clear()
        small, large = torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(12, 3, dtype=torch.float64)
        k = bmt_fast.rbf_kernel(small, large, 2.0)
        k.sum().backward()
        assert calls[0] == "rbf_kernel"
        x64 = small.detach().requires_grad_()
        expected = reference.rbf_kernel(x64, large, torch.tensor(2.0, dtype=torch.float64))
        torch.testing.assert_close(k, expected)
        expected.sum().backward()
        torch.testing.assert_close(small.grad, x64.grad)
    finally:
        monkeypatch.undo()
        backends._SELECTED.clear()


@requires_cpu_extension
@pytest.mark.parametrize("n, m, d, x_grad", [(600, None, 300, False), (600, 500, 300, False), (256, None, 8192, True),
                                              (512, 512, 4096, True)])  # fmt: skip
def test_bandwidth_gradient_in_fp32_as_accurate_as_torchs_formula(n, m, d, x_grad):
    """H's gradient in fp32, against float64: within 3x the error of the reference's own fp32 formula (its sum
    had been a BLAS dot in fp32: 1.1e-5 for the self kernel of 600 x 300, against the reference's 3.4e-7). H
    alone takes the blocked path; with x's gradient too, the symmetrised self-kernel pass and (many features)
    the GEMM-chunked one."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = None if m is None else torch.randn(m, d, generator=generator, dtype=torch.float64)
    weights = torch.randn(n, m or n, generator=generator, dtype=torch.float64)

    def gradient(dtype, backend):
        h = torch.tensor(2.0 * d, dtype=dtype, requires_grad=True)
        xd = x.to(dtype).requires_grad_(x_grad)
        k = bmt_fast.rbf_kernel(xd, None if y is None else y.to(dtype), h, backend=backend)
        return float(torch.autograd.grad((k * weights.to(dtype)).sum(), h)[0])

    exact = gradient(torch.float64, "torch")
    mine, torch_s = (abs(gradient(torch.float32, backend) / exact - 1) for backend in ("cpu", "torch"))
    assert mine <= 3 * max(torch_s, 1e-7), (mine, torch_s)
