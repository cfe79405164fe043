"""The Triton RBF kernel, forward and backward, against the float64 reference and its autograd."""

import pytest
import torch
from helpers import assert_within, float32_matmul_precision, relative_error, self_backward_expected, torch_error_in
from triton_helpers import DEVICE, kernels, on_device, requires_gpu, requires_triton, rounded_product_ulps, ulp

import bmt_fast
from bmt_fast import reference

pytestmark = requires_triton


def rows(n, d, *, offset=0.0, dtype=torch.float64, grad=False):
    t = (torch.randn(n, d, dtype=torch.float64) + offset).to(dtype).to(DEVICE)
    return t.requires_grad_(grad)


def bandwidth(value, grad=False):
    return torch.tensor(float(value), dtype=torch.float64, device=DEVICE, requires_grad=grad)


# (n, m, d): single entries, edges off the 64-wide blocks in every dimension, several d chunks.
SHAPES = [(1, 1, 1), (5, 7, 3), (65, 130, 129), (3, 4, 300)]


@pytest.mark.parametrize("n,m,d", SHAPES)
def test_values_fp64(n, m, d):
    x, y = rows(n, d), rows(m, d, offset=0.5)
    h = bandwidth(d)
    k = bmt_fast.rbf_kernel(x, y, h, backend="triton")
    assert k.shape == (n, m) and k.dtype == torch.float64
    assert relative_error(k, reference.rbf_kernel(x, y, h)) < 1e-12


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_values_fp32_within_twice_torch_error(offset):
    x64, y64 = (rows(70, 37, offset=offset).float().double() for _ in range(2))
    h = bandwidth(20.0)
    k = kernels().rbf_kernel_forward(x64.float(), y64.float(), h)
    shift = x64[:1]
    torch_error = torch_error_in(
        torch.float32, lambda a, b: reference.rbf_kernel(a - shift.to(a.dtype), b - shift.to(a.dtype), h.to(a.dtype)), x64, y64
    )
    assert_within(k, reference.rbf_kernel(x64, y64, h), torch_error)


def test_self_kernel_has_an_exact_unit_diagonal_and_median_bandwidth():
    x = rows(70, 6, offset=3.0).float()
    k = bmt_fast.rbf_kernel(x, backend="triton")
    assert torch.equal(k.diagonal(), torch.ones(70, device=DEVICE))
    torch.testing.assert_close(k, k.T)
    h = reference.median_bandwidth(x.double())
    assert relative_error(k, reference.rbf_kernel(x.double(), None, h)) < 2e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(1, 5), (13, 300), (16, 129), (40, 70)])
def test_self_kernel_by_the_gram_pass_and_by_tiles(dtype, n, d, monkeypatch):
    """A self kernel of up to GRAM_MAX_PARTICLES particles takes the split-K Gram pass (the tiled kernel ran
    one program per 64 x 64 tile of K, d looped inside: one program for a whole prompt); both algorithms
    against float64, an exact unit diagonal and symmetry, and the NaN rule: a NaN particle's pairs NaN."""
    import importlib

    kernels()
    module = importlib.import_module("bmt_fast.kernels.rbf_kernel")
    launched = []
    monkeypatch.setattr(module._FORWARD, "launch", lambda *a, _f=module._FORWARD.launch, **k: launched.append(1) or _f(*a, **k))
    x = (rows(n, d) * 1.5 + 4.0).to(dtype)
    x64 = x.double()
    h = bandwidth(0.8 * d)
    expected = reference.rbf_kernel(x64, None, h)
    bound = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 5e-2}[dtype]
    for algorithm in ("auto", "gram", "tiled"):
        launched.clear()
        k = kernels().rbf_kernel_forward(x, x, h, self_kernel=True, algorithm=algorithm)
        assert launched == ([1] if algorithm == "tiled" else [])
        assert k.dtype == dtype and k.shape == (n, n)
        assert torch.equal(k.diagonal(), torch.ones(n, dtype=dtype, device=DEVICE))
        exact = {"rtol": 0, "atol": 0} if algorithm != "tiled" else {}  # (one distance per pair)
        torch.testing.assert_close(k, k.T, **exact)
        assert relative_error(k, expected) < bound, algorithm
    if n > 1:
        bad = x.clone()
        bad[n // 2, d // 3] = float("nan")
        k = kernels().rbf_kernel_forward(bad, bad, h, self_kernel=True)
        others = [i for i in range(n) if i != n // 2]
        assert bool(torch.isnan(k[n // 2, others]).all() and torch.isnan(k[others, n // 2]).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,m,d", [(1, 16, 300), (1, 1, 5), (5, 7, 129), (13, 40, 70), (100, 200, 65)])
def test_cross_kernel_of_few_rows_by_the_gram_pass(dtype, n, m, d, monkeypatch):
    """rbf_kernel(x, y) with up to GRAM_MAX_PARTICLES rows in x and y together (the target stage's prior: one
    prompt against M particles) takes the split-K Gram pass of both sets' rows: against float64 and the
    tiled kernel; a NaN in y makes its column of K NaN, an infinity in x at least its row."""
    import importlib

    kernels()
    module = importlib.import_module("bmt_fast.kernels.rbf_kernel")
    launched = []
    monkeypatch.setattr(module._FORWARD, "launch", lambda *a, _f=module._FORWARD.launch, **k: launched.append(1) or _f(*a, **k))
    x, y = (rows(n, d) * 1.5 + 4.0).to(dtype), (rows(m, d) * 1.5 + 4.5).to(dtype)
    h = bandwidth(2.0 * d)
    expected = reference.rbf_kernel(x.double(), y.double(), h)
    bound = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 5e-2}[dtype]
    for algorithm in ("auto", "tiled"):
        launched.clear()
        k = kernels().rbf_kernel_forward(x, y, h, algorithm=algorithm)
        assert launched == ([1] if algorithm == "tiled" or n + m > 256 else [])  # (300 rows: tiles)
        assert k.dtype == dtype and k.shape == (n, m) and relative_error(k, expected) < bound, algorithm
    yb = y.clone()
    yb[m - 1, d // 2] = float("nan")
    k = kernels().rbf_kernel_forward(x, yb, h)
    assert bool(torch.isnan(k[:, m - 1]).all() and torch.isfinite(k[:, : m - 1]).all())
    xb = x.clone()
    xb[n - 1, 0] = float("inf")
    k = kernels().rbf_kernel_forward(xb, y, h)
    assert bool(torch.isnan(k[n - 1]).all())  # (the other rows too where x's centring shift carries the inf)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,m,d", [(1, 16, 300), (13, 40, 70), (20, 20, 129)])
def test_gradient_with_each_small_candidate_tile(dtype, n, m, d):
    """The gradient kernel's small autotuning candidates (a prompt's one row against M particles without
    64-row padding) forced in turn: both sides of a two-set kernel and the self kernel's one symmetrised
    pass, with H's gradient, against the reference's autograd in float64."""
    import importlib

    kernels()
    utils = importlib.import_module("bmt_fast.kernels.utils")
    assert [t.block_m for t in utils.SMALL_TILES] == [16, 32]
    x, y = (rows(n, d) + 3.0).to(dtype), (rows(m, d) + 3.2).to(dtype)
    h = bandwidth(1.5 * d)
    grad = torch.randn(n, m, dtype=torch.float64, device=DEVICE).to(dtype)
    leaves = [t.double().requires_grad_(True) for t in (x, y)] + [h.detach().clone().requires_grad_(True)]
    expected = torch.autograd.grad((reference.rbf_kernel(*leaves) * grad.double()).sum(), leaves)
    k = kernels().rbf_kernel_forward(x, y, h)
    bound = 1e-10 if dtype == torch.float64 else 1e-4
    grad_self = torch.randn(n, n, dtype=torch.float64, device=DEVICE).to(dtype)
    expected_self = self_backward_expected(grad_self, x, h)
    k_self = kernels().rbf_kernel_forward(x, x, h, self_kernel=True)
    for tile in utils.SMALL_TILES:
        got = kernels().rbf_kernel_backward(grad, x, y, k, h, tile=tile)
        for g, e in zip(got, expected):
            assert relative_error(g, e) < bound, tile
        got_self = kernels().rbf_kernel_self_backward(grad_self, x, k_self, h, tile=tile)
        for g, e in zip(got_self, expected_self):
            assert relative_error(g, e) < bound, tile


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("allow_tf32", [None, False, True])
def test_half_inputs(dtype, allow_tf32):
    """Split bf16 products (fp16's default) and allow_tf32=False (fp32): only the final rounding remains.
    One bf16 product (bf16's default; allow_tf32=True): centred rows rounded to bf16, measured up to 6e-2
    (~8 ulps of bf16) in K."""
    bf16_ulps = rounded_product_ulps(dtype, allow_tf32, 8.0)
    x, y = rows(33, 20, offset=2.0, dtype=dtype), rows(40, 20, offset=2.0, dtype=dtype)
    k = kernels().rbf_kernel_forward(x, y, bandwidth(40.0), allow_tf32=allow_tf32)
    assert k.dtype == dtype
    error = relative_error(k, reference.rbf_kernel(x.double(), y.double(), bandwidth(40.0)))
    assert error <= ulp(dtype) + bf16_ulps * ulp(torch.bfloat16), error


def test_tf32_only_when_asked_or_when_torch_allows_it():
    """fp32: IEEE products by default; TF32 with allow_tf32=True, or by default where torch's fp32 matmul
    precision allows it ("high", "medium"), as torch's own GEMMs; allow_tf32=False keeps IEEE there."""
    x, y = rows(33, 20).float(), rows(40, 20).float()
    expected = reference.rbf_kernel(x.double(), y.double(), bandwidth(40.0))

    def error(allow_tf32):
        return relative_error(kernels().rbf_kernel_forward(x, y, bandwidth(40.0), allow_tf32=allow_tf32), expected)

    exact, tf32 = error(None), error(True)
    assert exact < 1e-6 < tf32 < 2e-3
    for precision in ("high", "medium"):
        with float32_matmul_precision(precision):
            assert error(None) == tf32 and error(False) == exact


def test_gradients_match_reference_autograd_fp64():
    x, y, h = rows(70, 37, grad=True), rows(65, 37, offset=0.3, grad=True), bandwidth(30.0, grad=True)
    weights = torch.randn(70, 65, dtype=torch.float64, device=DEVICE)
    grads = torch.autograd.grad((bmt_fast.rbf_kernel(x, y, h, backend="triton") * weights).sum(), (x, y, h))
    expected = torch.autograd.grad((reference.rbf_kernel(x, y, h) * weights).sum(), (x, y, h))
    for g, e in zip(grads, expected):
        assert relative_error(g, e) < 1e-10


def test_gradients_fp32_and_self_kernel():
    """y=None: x is both sides, its gradient sums both; fp32 within 2e-5 of the fp64 gradient."""
    x = rows(70, 37).float().requires_grad_(True)
    weights = torch.randn(70, 70, device=DEVICE)
    (grad,) = torch.autograd.grad((bmt_fast.rbf_kernel(x, None, 25.0, backend="triton") * weights).sum(), (x,))
    x64 = x.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad((reference.rbf_kernel(x64, None, bandwidth(25.0)) * weights.double()).sum(), (x64,))
    assert grad.dtype == torch.float32
    assert relative_error(grad, expected) < 2e-5


@pytest.mark.parametrize("how", ["autograd", "op"])
def test_self_kernel_gradients_with_tiny_kernel_values(how):
    """A self kernel's own terms P_ii (x_i - x_i) = 0 are left out: with a small H they sat beside
    K_ij ~ 1e-14 in the fp32 sums, and the gradients lost every other term (as on the CPU). Through
    autograd (y=None) and through the op given x twice."""
    torch.manual_seed(4)
    x = rows(70, 37).float()
    h = float(torch.cdist(x.double(), x.double()).square().median()) / 87
    weights = torch.randn(70, 70, device=DEVICE)
    if how == "autograd":
        leaf = x.clone().requires_grad_(True)
        k = bmt_fast.rbf_kernel(leaf, None, h, backend="triton")
        (got,) = torch.autograd.grad((k * weights).sum(), (leaf,))
    else:
        k = kernels().rbf_kernel_forward(x, x, bandwidth(h).float(), self_kernel=True)
        gx, gy, _ = torch.ops.bmt_fast_triton.rbf_kernel_backward(weights, x, x, k, bandwidth(h).float(),
                                                                  [True, True, False])
        got = gx + gy
    assert 0.3 < float((k < 1e-30).double().mean()) < 0.9  # (0, or fp32 subnormals)
    p = weights.double() * k.detach().double()
    p = (p + p.T).fill_diagonal_(0)
    x64 = x.double()
    expected = -2 / h * (p.sum(1, keepdim=True) * x64 - p @ x64)
    assert relative_error(got, expected) < 2e-5


@pytest.fixture
def gradient_passes(monkeypatch):
    """Records each launch of the Triton gradient kernel as whether it took the symmetrised weights."""
    module = kernels().rbf_kernel
    passes = []
    grad_rows = module._grad_rows

    def recording(*args, **kwargs):
        passes.append(kwargs.get("symmetrised", False))
        return grad_rows(*args, **kwargs)

    monkeypatch.setattr(module, "_grad_rows", recording)
    return passes


@pytest.mark.parametrize("n, d", [(5, 3), (65, 130)])
@pytest.mark.parametrize("grad_kind", ["dense", "transposed", "ones", "row"])
def test_self_backward_op_sums_both_sides(n, d, grad_kind):
    """rbf_kernel_self_backward(grad, x, K, H): the weights (grad + grad^T) * K in one pass give the sum of
    x's two gradients and H's gradient as float64 autograd of sum(grad * K(x, x)) does, for a gradient of
    any layout (dense, a transposed view, autograd's expanded ones of K.sum(), an expanded row) and edges
    off the 64-row blocks and the 128-column chunks (65 x 130); each output alone is the pair's."""
    torch.manual_seed(n + d)
    x, h = rows(n, d), bandwidth(0.6 * d)
    k = kernels().rbf_kernel_forward(x, x, h, self_kernel=True)
    grad = {"dense": lambda: torch.randn(n, n, dtype=torch.float64),
            "transposed": lambda: torch.randn(n, n, dtype=torch.float64).T,
            "ones": lambda: torch.ones((), dtype=torch.float64).expand(n, n),
            "row": lambda: torch.randn(n, dtype=torch.float64).expand(n, n)}[grad_kind]().to(DEVICE)  # fmt: skip
    want_x, want_h = self_backward_expected(grad, x, h)
    op = torch.ops.bmt_fast_triton.rbf_kernel_self_backward
    gx, gh = op(grad, x, k, h, [True, True])
    assert gx.shape == x.shape and gh.shape == h.shape
    assert relative_error(gx, want_x) < 1e-10 and abs(float(gh - want_h)) < 1e-10 * max(1.0, abs(float(want_h)))
    only_x, no_h = op(grad, x, k, h, [True, False])
    no_x, only_h = op(grad, x, k, h, [False, True])
    assert torch.equal(only_x, gx) and not no_h.any() and not no_x.any()
    assert abs(float(only_h - gh)) < 1e-12 * max(1.0, abs(float(gh)))


def test_self_kernel_gradient_is_one_symmetrised_pass(gradient_passes):
    """Autograd of rbf_kernel(x) (fp32, H a tensor with its gradient) launches one gradient pass, with the
    symmetrised weights, where it had launched one per side; gradients within 2e-5 of float64."""
    x = rows(70, 37).float().requires_grad_(True)
    h = torch.tensor(25.0, device=DEVICE, requires_grad=True)
    weights = torch.randn(70, 70, device=DEVICE)
    grads = torch.autograd.grad((bmt_fast.rbf_kernel(x, None, h, backend="triton") * weights).sum(), (x, h))
    expected = self_backward_expected(weights, x.detach(), h.detach())
    assert gradient_passes == [True]
    assert relative_error(grads[0], expected[0]) < 2e-5 and relative_error(grads[1], expected[1]) < 2e-5


def test_gradcheck():
    x, y, h = rows(6, 3, grad=True), rows(5, 3, grad=True), bandwidth(2.5, grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: bmt_fast.rbf_kernel(a, b, c, backend="triton"), (x, y, h))


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
def test_backward_computes_only_what_is_asked(mask):
    x, y, h = rows(20, 9), rows(30, 9), bandwidth(6.0)
    k = kernels().rbf_kernel_forward(x, y, h)
    grad = torch.randn(20, 30, dtype=torch.float64, device=DEVICE).T.contiguous().T  # column-major strides
    got = torch.ops.bmt_fast_triton.rbf_kernel_backward(grad, x, y, k, h, list(mask))
    xr, yr, hr = x.clone().requires_grad_(), y.clone().requires_grad_(), h.clone().requires_grad_()
    expected = torch.autograd.grad((reference.rbf_kernel(xr, yr, hr) * grad).sum(), (xr, yr, hr))
    for wanted, g, e in zip(mask, got, expected):
        if wanted:
            assert relative_error(g, e) < 1e-10
        else:
            assert g.shape == e.shape and not g.any()


def test_kde_log_prior_decreases_away_from_particles():
    particles = rows(8, 16)
    theta = (particles.mean(0, keepdim=True) + 3.0).requires_grad_(True)
    h = bmt_fast.median_bandwidth(particles, backend="triton")
    opt = torch.optim.SGD([theta], lr=0.5)
    losses = []
    for _ in range(10):
        loss = -bmt_fast.rbf_kernel(theta, particles, h, backend="triton").mean().log()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 1.0


def test_opcheck():
    x, y, h = rows(5, 3), rows(4, 3), bandwidth(2.0)
    torch.library.opcheck(torch.ops.bmt_fast_triton.rbf_kernel.default, (x.requires_grad_(), y.requires_grad_(), h))
    k = kernels().rbf_kernel_forward(x.detach(), y.detach(), h)
    grad = torch.randn(5, 4, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(
        torch.ops.bmt_fast_triton.rbf_kernel_backward.default, (grad, x.detach(), y.detach(), k, h, [True, True, True])
    )
    k_self = kernels().rbf_kernel_forward(x.detach(), x.detach(), h, self_kernel=True)
    torch.library.opcheck(
        torch.ops.bmt_fast_triton.rbf_kernel_self_backward.default,
        (torch.randn(5, 5, dtype=torch.float64, device=DEVICE), x.detach(), k_self, h, [True, True]),
    )
    # transposed views: the gradients come back contiguous, and the fake kernels say so (they had kept the
    # views' strides, which inductor asserted on when compiling a loss of rbf_kernel(base.T, ...))
    xt, yt = rows(3, 5).t(), rows(3, 4).t()
    k = kernels().rbf_kernel_forward(xt, yt, h)
    torch.library.opcheck(
        torch.ops.bmt_fast_triton.rbf_kernel_backward.default, (grad, xt, yt, k, h, [True, True, True])
    )
    k_self = kernels().rbf_kernel_forward(xt, xt, h, self_kernel=True)
    torch.library.opcheck(
        torch.ops.bmt_fast_triton.rbf_kernel_self_backward.default,
        (torch.randn(5, 5, dtype=torch.float64, device=DEVICE), xt, k_self, h, [True, True]),
    )


@pytest.mark.parametrize("self_kernel", [False, True])
def test_torch_compile_forward_and_backward(self_kernel, gradient_passes):
    """Compiled (aot_eager, dynamic shapes) forward and backward equal the reference's; a self kernel's
    backward is still the one symmetrised pass (decided by identity, not by the data pointers of the fake
    tensors the backward is traced with)."""
    def loss(x, y, h):
        return (bmt_fast.rbf_kernel(x, y, h, backend="triton", check_inputs=False) ** 2).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=True)
    x, h = rows(6, 3, grad=True), bandwidth(2.0)
    y = None if self_kernel else rows(4, 3)
    out = compiled(x, y, h)
    out.backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (reference.rbf_kernel(x_ref, y, h) ** 2).sum().backward()
    torch.testing.assert_close(out, (reference.rbf_kernel(x.detach(), y, h) ** 2).sum())
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert gradient_passes == ([True] if self_kernel else [False])


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(4, 3), torch.randn(5, 2)), ValueError, "y must have d = 3"),
        (lambda: (torch.randn(4, 3), torch.randn(5, 3).double()), TypeError, "y must have the dtype"),
        (lambda: (torch.randn(4, 3), torch.randn(0, 3)), ValueError, "y must be a non-empty 2-D"),
    ],
)
def test_bad_inputs_name_the_argument(make, error, match):
    x, y = on_device(*make())
    with pytest.raises(error, match=match):
        torch.ops.bmt_fast_triton.rbf_kernel(x, y, torch.tensor(1.0, device=DEVICE))


def test_bad_backward_grad_shape():
    x, y, h = rows(4, 3), rows(5, 3), bandwidth(1.0)
    k = kernels().rbf_kernel_forward(x, y, h)
    with pytest.raises(ValueError, match=r"grad must have shape \(4, 5\)"):
        torch.ops.bmt_fast_triton.rbf_kernel_backward(k.T, x, y, k, h, [True, True, True])


@requires_gpu
def test_gpu_large_kernel_and_gradient():
    x, y = rows(3000, 100).float().requires_grad_(True), rows(2000, 100).float()
    k = bmt_fast.rbf_kernel(x, y, 200.0, backend="triton")
    expected = reference.rbf_kernel(x.detach().double(), y.double(), bandwidth(200.0))
    assert relative_error(k, expected) < 2e-6
    (grad,) = torch.autograd.grad(k.sum(), (x,))
    x64 = x.detach().double().requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(reference.rbf_kernel(x64, y.double(), bandwidth(200.0)).sum(), (x64,))
    assert relative_error(grad, expected_grad) < 2e-5


@pytest.mark.parametrize("n", [3, 66])
def test_double_backward(n):
    """create_graph=True gives gradients autograd differentiates again, in x, y and H, as on the compiled
    backends (the Triton backward ops have no derivative: "no autograd formula was registered" before)."""
    import functools

    x, y, h = rows(n, 2, grad=True), rows(4, 2, offset=0.3, grad=True), bandwidth(1.7, grad=True)
    check = functools.partial(torch.autograd.gradgradcheck, fast_mode=True)
    assert check(lambda a, b, c: bmt_fast.rbf_kernel(a, b, c, backend="triton"), (x, y, h))
    assert check(lambda a, c: bmt_fast.rbf_kernel(a, None, c, backend="triton"), (x, h))

