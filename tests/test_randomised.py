"""Randomised comparison of the CPU ops with float64 direct differences: many shapes (1 to 2,000 particles, 1
to 76,800 features, so every path of the CPU kernels is drawn), the four dtypes, the median rule and a given
bandwidth, strided inputs. Each case is reproducible from its number. A result must be within twice the
error of the reference's own formula (norm expansion, folded sums) run in the same precision, rounded to
the result's dtype, or within a floor of a few roundings of that dtype."""

import math
import random

import pytest
import torch
from helpers import CPU_BF16_AMX, amx_shift, relative_error, requires_cpu_extension

import bmt_fast
from bmt_fast import reference

pytestmark = requires_cpu_extension

CASES_PER_CHUNK = 50
CHUNKS = 6
FLOOR = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2, torch.float16: 5e-3}
OPS = ("step", "kernel", "cross", "gradient", "median")


def draw_shape(rng):
    kind = rng.random()
    if kind < 0.35:  # few particles: direct differences, the Gram path
        return rng.randint(1, 70), rng.choice([1, 2, 3, 7, 16, 31, 33, 64, 65, 127, 129, 256, 257, 513, 1000])
    if kind < 0.65:  # fused kernels, GEMM tiles, feature chunks
        return rng.randint(60, 700), rng.choice([1, 3, 8, 16, 17, 63, 64, 65, 128, 200, 256, 257, 768, 1100])
    if kind < 0.85:  # soft prompts
        return rng.randint(1, 24), rng.choice([2048, 4099, 8192, 40000, 76800])
    return rng.randint(700, 2000), rng.choice([1, 3, 16])  # several blocks of rows


def rows(rng, n, d, dtype):
    scale, offset = rng.choice([0.1, 1.0, 10.0]), rng.choice([0.0, 5.0])
    return (torch.randn(n, d, dtype=torch.float64) * scale + offset).to(dtype)


def sq_dists(a, b):
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").square()


def median_h(x64):
    return reference.bandwidth_from_median(reference.numpy_median(sq_dists(x64, x64)), x64.shape[0])


def self_gradient(k, g, x, h):
    """x's gradient of sum(g * K(x, x)) from K, x on both sides (float64)."""
    p = (g + g.T) * k
    return (-2 / h) * (p.sum(1, keepdim=True) * x - p @ x)


def exact(op, x64, h, y64=None, s64=None, g64=None):
    """The op in float64 from direct differences x_i - x_j (no cancellation)."""
    if op == "median":
        return median_h(x64)
    k = torch.exp(-sq_dists(x64, x64 if y64 is None else y64) / h)
    if op in ("kernel", "cross"):
        return k
    if op == "step":
        return (k @ s64 + (2 / h) * (k.sum(1, keepdim=True) * x64 - k @ x64)) / x64.shape[0]
    return self_gradient(k, g64, x64, h)


def run_case(number):
    rng = random.Random(number)
    torch.manual_seed(number)
    while True:
        n, d = draw_shape(rng)
        if n * n * d <= 4e7:
            break
    dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16])
    op = OPS[number % len(OPS)]
    acc = reference.accumulation_dtype(dtype)
    x = rows(rng, n, d, dtype)
    if rng.random() < 0.2 and n > 1 and d > 1:
        x = x.T.contiguous().T  # column-major
    x64 = x.double()
    median = rng.random() < 0.5 and op in ("step", "kernel")
    h64 = median_h(x64) * (1.0 if median else rng.choice([0.5, 1.0, 4.0]))
    h = "median" if median else float(h64)
    label = f"case {number}: {op} n={n} d={d} {dtype} bandwidth={'median' if median else f'{h:.4g}'}"
    if op == "step":
        s = rows(rng, n, d, dtype)
        got = bmt_fast.svgd_step(x, s, h, backend="cpu")
        ours_formula = reference.svgd_step(x.to(acc), s.to(acc), None if median else h64.to(acc))
        want = exact(op, x64, h64, s64=s.double())
    elif op == "kernel":
        got = bmt_fast.rbf_kernel(x, None, h, backend="cpu")
        ours_formula = reference.rbf_kernel(x.to(acc), None, reference.median_bandwidth(x.to(acc)) if median else h64.to(acc))
        want = exact(op, x64, h64)
    elif op == "cross":
        y = rows(rng, rng.randint(1, 300), d, dtype)
        got = bmt_fast.rbf_kernel(x, y, h, backend="cpu")
        ours_formula = reference.rbf_kernel(x.to(acc), y.to(acc), h64.to(acc))
        want = exact(op, x64, h64, y64=y.double())
    elif op == "median":
        got = bmt_fast.median_bandwidth(x)
        ours_formula = reference.median_bandwidth(x.to(acc))
        want = exact(op, x64, h64)
        if dtype == torch.bfloat16 and d >= 32 and CPU_BF16_AMX:
            # bf16 particles on AMX tiles (many of them): their distances from the exactly shifted particles
            # (amx_shift), norms in double, dot products summed in fp32 (columns left unshifted cancel more
            # than torch's centred formula); either yardstick may apply
            xs = (x.float() - amx_shift(x)).double()
            norms = (xs * xs).sum(1)
            on_amx = reference.bandwidth_from_median(
                reference.numpy_median((norms[:, None] + norms[None] - 2 * (xs.float() @ xs.float().T).double()).clamp_min(0)), n
            )
            if relative_error(on_amx, want) > relative_error(ours_formula, want):
                ours_formula = on_amx
    else:
        g64 = {"ones": lambda: torch.ones((), dtype=torch.float64).expand(n, n),
               "dense": lambda: torch.randn(n, n, dtype=torch.float64),
               "transposed": lambda: torch.randn(n, n, dtype=torch.float64).T}[rng.choice(["ones", "dense", "transposed"])]()  # fmt: skip
        # the exact answer for the gradient the op receives: K's dtype (g_ij + g_ji can cancel, and a 16-bit
        # rounding of g then moves p = (g + g^T) K by far more than the op's own error)
        g64 = g64.to(dtype).double()
        leaf = x.clone().requires_grad_(True)
        k = bmt_fast.rbf_kernel(leaf, None, h, backend="cpu")
        (got,) = torch.autograd.grad(k, leaf, g64.to(dtype))
        if dtype == torch.float16:
            # autograd saved K in fp16, whose subnormals hold small kernel values to a few bits: the yardstick
            # is exact arithmetic on that K
            ours_formula = self_gradient(k.detach().double(), g64, x64, h64)
        else:
            xa = x.to(acc).clone().requires_grad_(True)
            (ours_formula,) = torch.autograd.grad(reference.rbf_kernel(xa, None, h64.to(acc)), xa, g64.to(acc))
        want = exact(op, x64, h64, g64=g64)
    if float(want.abs().max()) < 1e-30:  # (results below fp32's normal range come out 0)
        return None
    out_dtype = acc if op == "median" else dtype  # (the median of 16-bit particles is in fp32)
    assert got.dtype == out_dtype and got.shape == want.shape, label
    err = relative_error(got, want)
    bound = max(2 * relative_error(ours_formula.to(out_dtype), want), FLOOR[out_dtype])
    assert math.isfinite(err) and err <= bound, f"{label}: relative error {err:.3e} > {bound:.3e}"
    return err


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_cpu_ops_against_float64_direct_differences(chunk):
    checked = [run_case(number) for number in range(chunk * CASES_PER_CHUNK, (chunk + 1) * CASES_PER_CHUNK)]
    assert sum(err is not None for err in checked) >= CASES_PER_CHUNK // 2
