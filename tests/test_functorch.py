"""The public ops under torch.func transforms: vmap over batches of particle sets (each entry as a single
call would give it), and grad / vjp / jacrev / jacfwd / hessian of rbf_kernel against the float64
reference differentiated by torch itself."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_BACKENDS, relative_error, requires_cpu_extension, run_cpu_variants
from triton_helpers import DEVICE, requires_triton

import bmt_fast
from bmt_fast import backends, reference

# every backend that runs on CPU tensors here, Triton's interpreter included (small shapes: it is slow)
BACKENDS = [*CPU_BACKENDS, pytest.param("triton", marks=requires_triton)]
BANDWIDTH = 1.7


def looped(fn, *batches: torch.Tensor) -> torch.Tensor:
    """fn on each batch entry in turn, stacked: what vmap must give."""
    return torch.stack([fn(*(b[i] for b in batches)) for i in range(batches[0].shape[0])])


def kernel64(x, y, h):
    """The float64 reference kernel (differentiable in x, y and h)."""
    return reference.rbf_kernel(x.double(), None if y is None else y.double(), h)


def weights(n: int, m: int) -> torch.Tensor:
    """Fixed weights of a scalar loss sum(w * K^2): every entry of K gets its own gradient."""
    return torch.linspace(-1.0, 2.0, n * m, dtype=torch.float64).reshape(n, m)


@pytest.fixture
def device(backend):
    """The device the backend runs on here (Triton: the GPU, or the CPU in the interpreter); the test's
    tensors are made there (torch.device as a context manager sets where factories put them)."""
    where = DEVICE if backend == "triton" else torch.device("cpu")
    with where:
        yield where


# --- vmap ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bandwidth", ["median", BANDWIDTH, "per_entry"])
def test_vmap_svgd_step_is_the_step_of_each_particle_set(backend, bandwidth, device):
    x = torch.randn(3, 9, 2, 3, dtype=torch.float64) * 1.5 + 4.0
    score = torch.randn(3, 9, 2, 3, dtype=torch.float64)
    if bandwidth == "per_entry":  # one H per batch entry, batched with the particles
        h = torch.tensor([0.8, 2.0, 5.0], dtype=torch.float64)
        phi = torch.func.vmap(lambda a, s, hb: bmt_fast.svgd_step(a, s, hb, backend=backend))(x, score, h)
        expected = looped(lambda a, s, hb: reference.svgd_step(a.reshape(9, 6), s.reshape(9, 6), hb), x, score, h)
    else:
        phi = torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s, bandwidth, backend=backend))(x, score)
        h = None if bandwidth == "median" else torch.tensor(bandwidth, dtype=torch.float64)
        expected = looped(lambda a, s: reference.svgd_step(a.reshape(9, 6), s.reshape(9, 6), h), x, score)
    assert phi.shape == x.shape
    assert relative_error(phi, expected.reshape(x.shape)) < 1e-12


@requires_cpu_extension
def test_vmap_svgd_step_batch_dims_anywhere_nested_and_shared():
    """in_dims other than 0, a score shared by every entry, and vmap of vmap: each entry as one call."""
    x = torch.randn(8, 2, 3, 5)  # particles, batch, batch, features (fp32)
    score = torch.randn(8, 5)

    def step(a, s):
        return bmt_fast.svgd_step(a, s, "median")

    phi = torch.func.vmap(torch.func.vmap(step, in_dims=(1, None)), in_dims=(1, None))(x, score)
    assert phi.shape == (2, 3, 8, 5)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(phi[i, j], step(x[:, i, j], score), rtol=0, atol=0)


@requires_cpu_extension
def test_vmap_svgd_step_checks_each_entry_and_refuses_out():
    x = torch.randn(3, 6, 4)
    bad = x.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="x contains 1 NaN/Inf"):
        torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s))(bad, x)
    # check_inputs=False passes through: the unchecked step of each entry
    phi = torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s, 2.0, check_inputs=False))(x, x)
    torch.testing.assert_close(phi, looped(lambda a, s: bmt_fast.svgd_step(a, s, 2.0), x, x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="out= is not supported inside torch.func"):
        torch.func.vmap(lambda a: bmt_fast.svgd_step(a, a, out=torch.empty(6, 4)))(x)
    with pytest.raises(ValueError, match="score must have the shape of x"):
        torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s))(x, x[:, :5])
    with pytest.raises(TypeError, match="score must have the dtype of x"):
        torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s))(x, x.double())
    # entries past the first: each one's bandwidth and values are checked as its own call would
    bad_score = x.clone()
    bad_score[2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="score contains 1 NaN/Inf"):
        torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s, 2.0))(x, bad_score)
    with pytest.raises(ValueError, match="bandwidth must be positive and finite, got -1.0"):
        torch.func.vmap(lambda a, h: bmt_fast.svgd_step(a, a, h))(x, torch.tensor([1.0, 2.0, -1.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_rbf_kernel_and_median(backend, device):
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    y = torch.randn(2, 5, 3, dtype=torch.float64)
    k = torch.func.vmap(lambda a: bmt_fast.rbf_kernel(a, backend=backend))(x)
    expected = looped(lambda a: kernel64(a, None, reference.median_bandwidth(a)), x)
    assert relative_error(k, expected) < 1e-12
    k = torch.func.vmap(lambda a, b: bmt_fast.rbf_kernel(a, b, BANDWIDTH, backend=backend))(x, y)
    assert relative_error(k, looped(lambda a, b: kernel64(a, b, torch.tensor(BANDWIDTH, dtype=torch.float64)), x, y)) < 1e-12
    h = torch.func.vmap(lambda a: bmt_fast.median_bandwidth(a, backend=backend))(x)
    assert relative_error(h, looped(reference.median_bandwidth, x)) < 1e-12


@requires_cpu_extension
@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_an_empty_batch(backend, device):
    """vmap over zero particle sets gives empty results of each op's shapes and dtypes (as vmap of torch's own
    ops does; until 2026-12-06 an IndexError from the first entry's slice), and bad arguments still raise."""
    xs = torch.randn(0, 6, 4)
    ys = torch.randn(0, 5, 4, dtype=torch.float64)
    assert torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s, backend=backend))(xs, xs).shape == (0, 6, 4)
    phi = torch.func.vmap(lambda a, s, h: bmt_fast.svgd_step(a, s, h, backend=backend))(xs, xs, torch.ones(0))
    assert phi.shape == (0, 6, 4) and phi.dtype == torch.float32
    assert torch.func.vmap(lambda a: bmt_fast.rbf_kernel(a, backend=backend))(xs).shape == (0, 6, 6)
    k = torch.func.vmap(lambda a, b: bmt_fast.rbf_kernel(a, b, 1.5, backend=backend))(ys[:, :3], ys)
    assert k.shape == (0, 3, 5) and k.dtype == torch.float64
    h = torch.func.vmap(lambda a: bmt_fast.median_bandwidth(a, backend=backend))(ys)
    assert h.shape == (0,) and h.dtype == torch.float64
    with pytest.raises(ValueError, match="score must have the shape of x"):
        torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s, backend=backend))(xs, torch.randn(0, 6, 3))
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        torch.func.vmap(lambda a: bmt_fast.rbf_kernel(a, None, -1.0, backend=backend))(xs)


def test_vmap_sampled_median_follows_vmap_randomness():
    x = torch.randn(40, 2).expand(3, 40, 2)  # three identical entries

    def sampled(a):
        return bmt_fast.median_bandwidth(a, method="sampled", num_pairs=7)

    with pytest.raises(RuntimeError, match='randomness="different"'):
        torch.func.vmap(sampled)(x)
    torch.manual_seed(5)
    same = torch.func.vmap(sampled, randomness="same")(x)
    torch.manual_seed(5)
    first = sampled(x[0])
    assert torch.equal(same, first.expand(3))
    torch.manual_seed(5)
    different = torch.func.vmap(sampled, randomness="different")(x)
    assert different[0] == first and len(set(different.tolist())) > 1
    # as many samples as pairs: the exact median, no random draw, whatever the randomness
    exact = torch.func.vmap(lambda a: bmt_fast.median_bandwidth(a, method="sampled", num_pairs=1600))(x)
    assert torch.equal(exact, bmt_fast.median_bandwidth(x[0]).expand(3))


# --- grad, vjp, jacrev, jacfwd, hessian --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["self", "cross", "median"])
def test_grad_of_rbf_kernel_is_the_reference_gradient(backend, case, device):
    x = torch.randn(9, 2, 2, dtype=torch.float64)
    y = None if case != "cross" else torch.randn(6, 2, 2, dtype=torch.float64)
    h = torch.tensor(BANDWIDTH, dtype=torch.float64)
    m = 9 if y is None else 6
    w = weights(9, m)

    def loss(kernel):
        return (w * kernel.reshape(9, m) ** 2).sum()

    if case == "median":  # H the median's, a constant
        got = torch.func.grad(lambda a: loss(bmt_fast.rbf_kernel(a, backend=backend)))(x)
        hm = reference.median_bandwidth(x.reshape(9, 4))
        expected = torch.func.grad(lambda a: loss(kernel64(a.reshape(9, 4), None, hm)))(x)
        assert relative_error(got, expected) < 1e-12
        return
    argnums = (0, 2) if y is None else (0, 1, 2)
    got = torch.func.grad(lambda a, b, hh: loss(bmt_fast.rbf_kernel(a, b, hh, backend=backend)), argnums=argnums)(x, y, h)
    expected = torch.func.grad(
        lambda a, b, hh: loss(kernel64(a.reshape(9, 4), None if b is None else b.reshape(m, 4), hh)), argnums=argnums
    )(x, y, h)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert relative_error(g, e) < 1e-12


@requires_cpu_extension
def test_grad_in_float32_and_a_float32_bandwidth():
    x64 = torch.randn(20, 6, dtype=torch.float64)
    h = torch.tensor(3.0)
    got = torch.func.grad(lambda a, hh: bmt_fast.rbf_kernel(a, None, hh).sum(), argnums=(0, 1))(x64.float(), h)
    expected = torch.func.grad(lambda a, hh: kernel64(a, None, hh).sum(), argnums=(0, 1))(x64, h.double())
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[1].shape == ()
    assert relative_error(got[0], expected[0]) < 1e-5
    assert relative_error(got[1], expected[1]) < 1e-5


@requires_cpu_extension
def test_one_level_of_grad_or_vjp_runs_the_backward_kernel_and_nested_transforms_the_formula(monkeypatch):
    """Where nothing differentiates the gradient again the compiled backward op computes it; jacrev (a
    vmap of vjp) and hessian take the differentiable formula."""
    kernel_calls, formula_calls = [], []
    compiled, formula = backends.compiled_rbf_kernel_vjp, reference.rbf_kernel_vjp
    monkeypatch.setattr(backends, "compiled_rbf_kernel_vjp", lambda *a: kernel_calls.append(1) or compiled(*a))
    monkeypatch.setattr(reference, "rbf_kernel_vjp", lambda *a: formula_calls.append(1) or formula(*a))
    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randn(5, 3, dtype=torch.float64)
    torch.func.grad(lambda a: bmt_fast.rbf_kernel(a, None, BANDWIDTH).sum())(x)
    _, vjp = torch.func.vjp(lambda a: bmt_fast.rbf_kernel(a, y, BANDWIDTH), x)
    vjp(torch.ones(8, 5, dtype=torch.float64))
    assert (len(kernel_calls), len(formula_calls)) == (2, 0)
    torch.func.jacrev(lambda a: bmt_fast.rbf_kernel(a, y, BANDWIDTH))(x)
    torch.func.hessian(lambda a: bmt_fast.rbf_kernel(a, None, BANDWIDTH).sum())(x)
    assert len(kernel_calls) == 2 and len(formula_calls) == 2
    # grad of grad: the inner gradient by the formula, which the outer grad differentiates; its path back
    # through K (the forward's output) is the outer level's own, last, backward: the kernel again
    torch.func.grad(lambda a: torch.func.grad(lambda b: bmt_fast.rbf_kernel(b, y, BANDWIDTH).sum())(a).sum())(x)
    assert len(kernel_calls) == 3 and len(formula_calls) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacobians_and_hessians_of_rbf_kernel(backend, device):
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64)
    h = torch.tensor(BANDWIDTH, dtype=torch.float64)

    def ours(a, b, hh):
        return bmt_fast.rbf_kernel(a, b, hh, backend=backend)

    for transform in (torch.func.jacrev, torch.func.jacfwd):
        got = transform(ours, argnums=(0, 1, 2))(x, y, h)
        expected = transform(kernel64, argnums=(0, 1, 2))(x, y, h)
        for g, e in zip(got, expected):
            assert relative_error(g, e) < 1e-12
    w = weights(5, 5)
    got = torch.func.hessian(lambda a, hh: (w * ours(a, None, hh) ** 2).sum(), argnums=(0, 1))(x, h)
    expected = torch.func.hessian(lambda a, hh: (w * kernel64(a, None, hh) ** 2).sum(), argnums=(0, 1))(x, h)
    for got_row, expected_row in zip(got, expected):
        for g, e in zip(got_row, expected_row):
            assert relative_error(g, e) < 1e-11


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_through_the_median_and_a_step(backend, device):
    """jvp / jacfwd / hessian of a function that takes the median bandwidth or a step: those are constants
    there, as under grad (torch.argmax has no tangent either); they had raised "You must implement the jvp
    function". The Hessian with the median held constant is the one at that bandwidth."""
    x = torch.randn(6, 3, dtype=torch.float64)
    w = weights(6, 6)

    def with_median(a):
        return (w * bmt_fast.rbf_kernel(a, None, bmt_fast.median_bandwidth(a, backend=backend), backend=backend)).sum()

    h = bmt_fast.median_bandwidth(x, backend=backend)
    got = torch.func.hessian(with_median)(x)
    expected = torch.func.hessian(lambda a: (w * kernel64(a, None, h)).sum())(x)
    assert relative_error(got, expected) < 1e-11
    phi, tangent = torch.func.jvp(lambda a: bmt_fast.svgd_step(a, -a, 1.5, backend=backend), (x,), (torch.ones_like(x),))
    torch.testing.assert_close(phi, reference.svgd_step(x, -x, torch.tensor(1.5, dtype=torch.float64)))
    assert not tangent.any()
    assert not torch.func.jacfwd(lambda a: bmt_fast.median_bandwidth(a, backend=backend))(x).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_functionalize_runs_the_ops(backend):
    """torch.func.functionalize of each public function (and svgd_step with out=): "NYI: Functionalize rule
    for custom_function_call", and svgd_step's in-place op refused, before."""
    x = torch.randn(8, 5, dtype=torch.float64)
    h = torch.tensor(0.8, dtype=torch.float64)
    expected = reference.svgd_step(x, -x, h)
    phi = torch.func.functionalize(lambda a: bmt_fast.svgd_step(a, -a, h, backend=backend))(x)
    torch.testing.assert_close(phi, expected)
    out = torch.empty_like(x)
    torch.func.functionalize(lambda a, o: bmt_fast.svgd_step(a, -a, h, backend=backend, out=o))(x, out)
    torch.testing.assert_close(out, expected)
    k = torch.func.functionalize(lambda a: bmt_fast.rbf_kernel(a, None, h, backend=backend))(x)
    torch.testing.assert_close(k, kernel64(x, None, h))
    median = torch.func.functionalize(lambda a: bmt_fast.median_bandwidth(a, backend=backend))(x)
    torch.testing.assert_close(median, bmt_fast.median_bandwidth(x, backend="torch"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_float_bandwidth_first_used_under_functionalize_serves_later_plain_calls(backend):
    """A float H is made into a tensor once per value and cached; made under functionalize it was a
    functional wrapper, handed to every later plain call with that value: svgd_step raised ("a custom
    operator whose output has alias annotations"), rbf_kernel returned a tensor without storage."""
    x = torch.randn(6, 3, dtype=torch.float64)
    h = 2.4375 + 0.0625 * CPU_BACKENDS.index(backend)  # (a value no other test has cached)
    torch.func.functionalize(lambda a: bmt_fast.svgd_step(a, -a, h, backend=backend))(x)
    torch.func.functionalize(lambda a: bmt_fast.rbf_kernel(a, None, h, backend=backend))(x)
    h64 = torch.tensor(h, dtype=torch.float64)
    phi, k = bmt_fast.svgd_step(x, -x, h, backend=backend), bmt_fast.rbf_kernel(x, None, h, backend=backend)
    assert not torch._is_functional_tensor(phi) and not torch._is_functional_tensor(k)
    torch.testing.assert_close(phi, reference.svgd_step(x, -x, h64))
    torch.testing.assert_close(k, kernel64(x, None, h64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["cross", "self", "twice", "median"])
def test_forward_mode_autograd_of_rbf_kernel(backend, case, device):
    """torch.autograd.forward_ad outside torch.func (dual tensors, and torch.autograd.functional.jacobian's
    forward mode): K carries the tangent of the float64 reference, for tangents of x, y and a tensor
    bandwidth (the compiled op alone had given K no tangent: a forward-mode jacobian of 0)."""
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(5, 3, dtype=torch.float64)
    y = None if case in ("self", "median") else x if case == "twice" else torch.randn(4, 3, dtype=torch.float64)
    h = "median" if case == "median" else torch.tensor(BANDWIDTH, dtype=torch.float64)
    tx = torch.randn_like(x)
    ty = None if case != "cross" else torch.randn_like(y)
    th = None if case == "median" else torch.tensor(0.3, dtype=torch.float64)
    h_ref = bmt_fast.median_bandwidth(x, backend="torch") if case == "median" else h
    expected = torch.func.jvp(lambda a, b, hh: kernel64(a, b if case == "cross" else None, hh),
                              (x, y if case == "cross" else x, h_ref),
                              (tx, ty if case == "cross" else torch.zeros_like(x), th if th is not None
                               else torch.zeros_like(h_ref)))  # fmt: skip
    with fwAD.dual_level():
        dx = fwAD.make_dual(x, tx)
        dy = dx if case == "twice" else None if y is None else fwAD.make_dual(y, ty)
        dh = h if th is None else fwAD.make_dual(h, th)
        primal, tangent = fwAD.unpack_dual(bmt_fast.rbf_kernel(dx, dy, dh, backend=backend))
    assert tangent is not None
    assert relative_error(primal, expected[0]) < 1e-12
    assert relative_error(tangent, expected[1]) < 1e-11
    jacobian = torch.autograd.functional.jacobian(
        lambda a: bmt_fast.rbf_kernel(a, y if case == "cross" else None, h, backend=backend), x,
        strategy="forward-mode", vectorize=True,
    )  # fmt: skip
    reverse = torch.autograd.functional.jacobian(lambda a: kernel64(a, y if case == "cross" else None, h_ref), x)
    assert relative_error(jacobian, reverse) < 1e-11


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_grad_hessian_vector_products(backend, device):
    """grad of (grad . v): a Hessian-vector product, both levels torch.func.grad, in x and in H."""
    x = torch.randn(6, 3, dtype=torch.float64)
    v = torch.randn(6, 3, dtype=torch.float64)
    h = torch.tensor(BANDWIDTH, dtype=torch.float64)
    w = weights(6, 6)

    def hvp(kernel):
        def loss(a, hh):
            return (w * kernel(a, None, hh) ** 2).sum()

        return torch.func.grad(lambda a, hh: (torch.func.grad(loss)(a, hh) * v).sum(), argnums=(0, 1))(x, h)

    got = hvp(lambda a, b, hh: bmt_fast.rbf_kernel(a, b, hh, backend=backend))
    expected = hvp(kernel64)
    for g, e in zip(got, expected):
        assert relative_error(g, e) < 1e-12


@requires_cpu_extension
def test_vmap_of_grad_and_grad_of_vmap():
    """Per-chain gradients (vmap of grad) and the gradient of a batched loss (grad of vmap), each with
    per-chain median bandwidths."""
    x = torch.randn(3, 7, 4, dtype=torch.float64)

    def loss(a):
        return (bmt_fast.rbf_kernel(a) ** 2).sum()

    def loss64(a):
        return (kernel64(a, None, reference.median_bandwidth(a).detach()) ** 2).sum()  # H a constant

    per_chain = torch.func.vmap(torch.func.grad(loss))(x)
    expected = looped(torch.func.grad(loss64), x)
    assert relative_error(per_chain, expected) < 1e-12
    total = torch.func.grad(lambda b: torch.func.vmap(loss)(b).sum())(x)
    assert relative_error(total, expected) < 1e-12


def test_reference_vjp_and_jvp_formulas_are_torch_autograd_of_the_reference():
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64)
    h = torch.tensor(2.3, dtype=torch.float64)
    for other in (None, y):
        m = 6 if other is None else 4
        grad = weights(6, m)
        primals = (x, h) if other is None else (x, other, h)
        kernel, vjp = torch.func.vjp(lambda *p: kernel64(p[0], None if other is None else p[1], p[-1]), *primals)
        expected = vjp(grad)
        got = reference.rbf_kernel_vjp(grad, x, other, h, kernel, (True, other is not None, True))
        got = [g for g in got if g is not None]
        for g, e in zip(got, expected):
            assert relative_error(g, e) < 1e-13
        tangents = tuple(torch.randn_like(p) for p in primals)
        _, expected_dk = torch.func.jvp(lambda *p: kernel64(p[0], None if other is None else p[1], p[-1]), primals, tangents)
        full = (tangents[0], None, tangents[-1]) if other is None else tangents
        assert relative_error(reference.rbf_kernel_jvp(x, other, h, kernel, full), expected_dk) < 1e-13


@requires_cpu_extension
def test_registered_ops_and_compiled_vmaps_take_torchs_per_entry_fallback():
    """torch.ops.bmt_fast.* on batched tensors (no rules of ours at the op level), and the public step under
    torch.compile of a vmapped function (dynamo traces vmap without the autograd.Function rules): the
    entries as single calls give them."""
    x = torch.randn(3, 20, 4, dtype=torch.float64)
    score = torch.randn(3, 20, 4, dtype=torch.float64)
    h = torch.tensor(BANDWIDTH, dtype=torch.float64)
    ops = torch.ops.bmt_fast
    grad = weights(20, 20)

    kernels = looped(lambda a: ops.rbf_kernel(a, a, h), x)  # (x passed twice: the self kernel)

    def self_backward(a, k):
        return ops.rbf_kernel_self_backward(grad, a, k, h, [True, True])[0]

    cases = {
        "svgd_step": (lambda a, s: ops.svgd_step(a, s, h), (x, score)),
        "rbf_kernel": (lambda a, b: ops.rbf_kernel(a, b, h), (x, score)),
        "rbf_kernel_median": (lambda a: ops.rbf_kernel_median(a)[0], (x,)),
        "median_bandwidth": (ops.median_bandwidth, (x,)),
        "rbf_kernel_self_backward": (self_backward, (x, kernels)),
    }
    for name, (fn, args) in cases.items():
        torch.testing.assert_close(torch.func.vmap(fn)(*args), looped(fn, *args), rtol=0, atol=0, msg=name)
    step = torch.compile(
        torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s, BANDWIDTH, check_inputs=False)), backend="eager"
    )
    torch.testing.assert_close(step(x, score), looped(lambda a, s: bmt_fast.svgd_step(a, s, BANDWIDTH), x, score))


def test_compiled_vmaps_check_their_inputs():
    """torch.compile of a vmapped function with the checks on (the default): the entries as single calls
    give them, and a NaN is the op's own error (the NaN/Inf scans' .item() had failed inside the traced
    vmap with vmap's "calling .item() on a Tensor"; the ops now run eagerly there)."""
    torch._dynamo.reset()
    x = torch.randn(3, 20, 4, dtype=torch.float64)
    score = torch.randn(3, 20, 4, dtype=torch.float64)
    cases = {
        "svgd_step": lambda a, s: bmt_fast.svgd_step(a, s, BANDWIDTH),
        "svgd_step median": lambda a, s: bmt_fast.svgd_step(a, s),
        "rbf_kernel": lambda a, s: bmt_fast.rbf_kernel(a, s),
        "median_bandwidth": lambda a, s: bmt_fast.median_bandwidth(a),
    }
    bad = x.clone()
    bad[1, 3, 2] = float("nan")
    # (the eager calls are made while dynamo traces: importing bmt_fast does not import dynamo, a second or
    # more for every user, and torch's trace rules probe optional packages then)
    import subprocess
    import sys

    probe = "import sys, torch; before = 'torch._dynamo' in sys.modules; import bmt_fast; print(before, 'torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split() == ["False", "False"]
    for name, fn in cases.items():
        compiled = torch.compile(torch.func.vmap(fn), backend="eager")
        torch.testing.assert_close(compiled(x, score), looped(fn, x, score), rtol=0, atol=0, msg=name)
        with pytest.raises(ValueError, match="x contains 1 NaN/Inf value"):
            compiled(bad, score)


@pytest.fixture
def two_threads():
    """Two intra-op threads (CI's machine has two cores), so that the batched op spreads sets over them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def batched_calls(monkeypatch):
    """The sets' counts of each call of the CPU backend's batched op (svgd_step_batched_into)."""
    cpu = backends.get("cpu")
    calls = []
    batched = cpu.svgd_step_batched_into
    monkeypatch.setattr(cpu, "svgd_step_batched_into", lambda x, *a: calls.append(x.shape[0]) or batched(x, *a))
    return calls


# (sets, particles, features, dtype): sets small enough to be spread over the threads one set each (the
# single op would run them on one thread), a set of few particles with many features (the Gram path), sets
# above the serial bound (run one after another with every thread), and below it with hundreds of features
# (the feature-chunk and GEMM-tile paths in worker threads); fp64 and 16-bit particles.
BATCHED_CASES = [
    (300, 20, 3, torch.float32),
    (40, 12, 1, torch.float64),
    (3, 16, 3000, torch.float32),
    (2, 300, 40, torch.float32),
    (6, 100, 300, torch.float32),  # spread over the threads, on paths beyond the fused and Gram kernels
    (4, 90, 300, torch.float64),
    (24, 40, 33, torch.bfloat16),
    (5, 24, 70, torch.float16),
]


@requires_cpu_extension
@pytest.mark.parametrize("sets,n,d,dtype", BATCHED_CASES)
@pytest.mark.parametrize("bandwidth", ["median", BANDWIDTH, "per_entry", "shared_score"])
def test_vmap_svgd_step_on_cpu_is_one_batched_op_bit_for_bit(two_threads, batched_calls, sets, n, d, dtype, bandwidth):
    """On the CPU backend vmap runs every set in one op (torch.ops.bmt_fast.svgd_step_batched_into), whose
    phi of each set is the single call's on it bit for bit, however the op shares the sets among threads;
    and the single calls match the float64 reference."""
    x = (torch.randn(sets, n, d, dtype=torch.float64) * 1.5 + 4.0).to(dtype)
    score = torch.randn(sets, n, d, dtype=torch.float64).to(dtype)
    if bandwidth == "per_entry":
        h = torch.rand(sets, dtype=torch.float64) * 4.0 * d + 0.5
        phi = torch.func.vmap(lambda a, s, hb: bmt_fast.svgd_step(a, s, hb, backend="cpu"))(x, score, h)
        singles = looped(lambda a, s, hb: bmt_fast.svgd_step(a, s, hb, backend="cpu"), x, score, h)
    elif bandwidth == "shared_score":  # one score for every set (vmap does not batch it)
        phi = torch.func.vmap(lambda a: bmt_fast.svgd_step(a, score[0], backend="cpu"))(x)
        singles = looped(lambda a: bmt_fast.svgd_step(a, score[0], backend="cpu"), x)
    else:
        phi = torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s, bandwidth, backend="cpu"))(x, score)
        singles = looped(lambda a, s: bmt_fast.svgd_step(a, s, bandwidth, backend="cpu"), x, score)
    assert batched_calls == [sets]
    assert phi.dtype == dtype and phi.shape == x.shape
    assert torch.equal(phi, singles)
    if dtype in (torch.float32, torch.float64):  # each single call against the float64 reference
        first = score[0] if bandwidth == "shared_score" else score[-1]
        hh = h[-1] if bandwidth == "per_entry" else None if bandwidth in ("median", "shared_score") else BANDWIDTH
        expected = reference.svgd_step(x[-1].double(), first.double(), None if hh is None else torch.as_tensor(hh, dtype=torch.float64))
        assert relative_error(phi[-1], expected) < (1e-10 if dtype == torch.float64 else 1e-4)


BATCHED_VARIANTS_SCRIPT = """
import sys, torch
torch.set_num_threads(2)
ops = torch.ops.bmt_fast
import bmt_fast
results = {}
for n, d, dtype in ((31, 200, torch.float64), (31, 65, torch.float64), (20, 8, torch.float32), (100, 300, torch.float32)):
    torch.manual_seed(n + d)
    x, score = torch.randn(40, n, d, dtype=dtype), torch.randn(40, n, d, dtype=dtype)
    for h in (None, torch.rand(40, dtype=torch.float64) * d + 1):
        out = torch.empty_like(x)
        flags = ops.svgd_step_batched_into(x, score, h, "tiled", out=out)
        singles = torch.stack([ops.svgd_step(x[i], score[i], None if h is None else h[i], "tiled") for i in range(40)])
        results[(n, d, h is None)] = (torch.equal(out, singles), bool(flags.all()))
torch.save(results, sys.argv[1])
"""


@requires_cpu_extension
def test_batched_op_is_the_single_op_bit_for_bit_on_every_cpu_path(tmp_path):
    """Sets on the GEMM tiles and feature chunks (torch's GEMMs, whose results inside a parallel region were an
    ulp apart for some shapes) run one after another, those on the fused kernels are spread over the threads:
    each set's phi the single op's bit for bit with the fused kernels on and off."""
    results = run_cpu_variants(tmp_path, BATCHED_VARIANTS_SCRIPT, {"fused": {}, "gemm": {"BMT_FAST_CPU_FUSED": "0"}})
    for variant, cases in results.items():
        for case, (equal, finite) in cases.items():
            assert equal and finite, (variant, case)


@requires_cpu_extension
def test_vmap_batched_step_names_the_bad_set_and_passes_unchecked_nan_through(two_threads, batched_calls):
    """A NaN/Inf in one set of many (the batched op's flag for that set) is named as a single call on it names
    it; check_inputs=False returns phi, NaN in that set alone; a batched bandwidth is checked set by set (the
    CPU kernels reject a non-positive one even unchecked); phi that overflows from finite inputs is returned."""
    x = torch.randn(64, 10, 3)
    score = -x
    for which, values in (("x", x), ("score", score)):
        for value in (float("nan"), float("inf")):
            bad = values.clone()
            bad[37, 4, 1] = value
            xs, ss = (bad, score) if which == "x" else (x, bad)
            for bandwidth in ("median", BANDWIDTH):
                with pytest.raises(ValueError, match=f"{which} contains 1 NaN/Inf"):
                    torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s, bandwidth))(xs, ss)
                phi = torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s, bandwidth, check_inputs=False))(xs, ss)
                finite = torch.isfinite(phi).flatten(1).all(1)
                assert not finite[37] and finite[:37].all() and finite[38:].all(), (which, value, bandwidth)
                assert torch.equal(phi[:37], looped(lambda a, s: bmt_fast.svgd_step(a, s, bandwidth), x[:37], score[:37]))
    h = torch.full((64,), 2.0)
    for value in (-1.0, 0.0, float("nan"), float("inf")):
        h[50] = value
        for check_inputs in (True, False):
            with pytest.raises((ValueError, RuntimeError), match="bandwidth must be positive and finite"):
                torch.func.vmap(lambda a, s, hb: bmt_fast.svgd_step(a, s, hb, check_inputs=check_inputs))(x, score, h)
    # every step above took the batched op, but the checked ones with a bad H: refused before it (the unchecked
    # ones by the kernel)
    assert len(batched_calls) == 2 * 2 * 2 * 2 + 4


@requires_cpu_extension
def test_vmap_batched_step_scans_every_set_first_where_kernels_do_not_flag(monkeypatch, batched_calls):
    """Where the backend's kernels do not flag a non-finite phi themselves (CUDA's beyond its register kernels;
    here the CPU told so), all sets' inputs are scanned before the op, the bad set named, and unchecked calls
    pass NaN through as the kernels give it."""
    monkeypatch.setattr(backends.get("cpu"), "svgd_step_spreads_non_finite", lambda x: False)
    x = torch.randn(9, 6, 4)
    bad = x.clone()
    bad[6, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="score contains 1 NaN/Inf"):
        torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s))(x, bad)
    assert batched_calls == []  # (refused before the op)
    phi = torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s, check_inputs=False))(bad, -x)
    assert batched_calls == [9]
    assert torch.isnan(phi[6]).all() and torch.equal(phi[:6], looped(lambda a, s: bmt_fast.svgd_step(a, s), x[:6], -x[:6]))
    assert torch.equal(torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s))(x, -x), looped(bmt_fast.svgd_step, x, -x))


@requires_cpu_extension
def test_vmap_batched_step_returns_a_non_finite_phi_of_finite_inputs(monkeypatch):
    """A set flagged non-finite whose inputs hold no NaN/Inf (phi overflowed) is returned as computed, as a
    single call returns it: the flags only say which sets' inputs to scan."""
    cpu = backends.get("cpu")
    batched = cpu.svgd_step_batched_into
    monkeypatch.setattr(cpu, "svgd_step_batched_into", lambda *a: batched(*a).zero_())  # every set "not finite"
    x = torch.randn(6, 5, 4)
    phi = torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s))(x, -x)
    assert torch.equal(phi, looped(lambda a, s: bmt_fast.svgd_step(a, s), x, -x))


@requires_cpu_extension
def test_vmap_keeps_x_passed_twice_one_tensor(monkeypatch):
    """rbf_kernel(x, x) under vmap: the op sees one slice on both sides (the self kernel, bit for bit as
    rbf_kernel(x, x) of each entry, and its one-pass gradient)."""
    x = torch.randn(2, 30, 3)
    k = torch.func.vmap(lambda a: bmt_fast.rbf_kernel(a, a, BANDWIDTH))(x)
    torch.testing.assert_close(k, looped(lambda a: bmt_fast.rbf_kernel(a, a, BANDWIDTH), x), rtol=0, atol=0)
    passes = []
    self_backward = torch.ops.bmt_fast.rbf_kernel_self_backward
    monkeypatch.setattr(torch.ops.bmt_fast, "rbf_kernel_self_backward", lambda *a: passes.append(1) or self_backward(*a))
    h = torch.tensor(BANDWIDTH, dtype=torch.float64)
    got = torch.func.grad(lambda a: (bmt_fast.rbf_kernel(a, a, h) ** 2).sum())(x[0].double())
    expected = torch.func.grad(lambda a: (kernel64(a, a, h) ** 2).sum())(x[0].double())
    assert passes == [1]
    assert relative_error(got, expected) < 1e-12
    _, tangent = torch.func.jvp(lambda a: bmt_fast.rbf_kernel(a, a, h), (x[0].double(),), (x[1].double(),))
    _, expected = torch.func.jvp(lambda a: kernel64(a, a, h), (x[0].double(),), (x[1].double(),))
    assert relative_error(tangent, expected) < 1e-12


@requires_cpu_extension
def test_vmap_calls_torchs_vmap_helper_directly(monkeypatch):
    """Where the innermost transform is a vmap the rule is reached through torch's vmap helper directly (what
    autograd.Function.apply would reach, without its dispatch). Nested vmaps: the inner level's rule once,
    then for each of its entries (still batched at the outer level) the outer one's."""
    from bmt_fast import _functorch

    calls = []
    helper = _functorch.custom_function_call_vmap_helper
    if helper is None:
        pytest.skip("this torch has no custom_function_call_vmap_helper: Function.apply serves")
    monkeypatch.setattr(_functorch, "custom_function_call_vmap_helper", lambda *a: calls.append(a[2]) or helper(*a))
    x = torch.randn(2, 3, 10, 4)
    torch.func.vmap(torch.func.vmap(bmt_fast.svgd_step))(x, x)
    torch.func.vmap(bmt_fast.rbf_kernel)(x[0])
    torch.func.vmap(bmt_fast.median_bandwidth)(x[0])
    assert [c.__name__ for c in calls] == ["_SVGDStep"] * (1 + 3) + ["_RBFKernel", "_MedianBandwidth"]
