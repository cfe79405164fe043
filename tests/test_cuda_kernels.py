"""The CUDA kernels (csrc/cuda) against the float64 reference, on two targets:

* "gpu": torch.ops.bmt_fast on CUDA tensors (skips without a GPU or without the CUDA extension);
* "emulator": the same kernel and op source compiled for the CPU emulator (csrc/cuda/emulation), loaded
  as torch.ops.bmt_fast_cuda_emulated on CPU tensors. It runs in CI, without a GPU, on small shapes:
  indexing, tile edges, the cp.async pipeline, barriers and the tensor-core fragment layouts as the PTX
  ISA documents them. It cannot show what only hardware shows (speed, the exact rounding inside an MMA).

Shapes are chosen for the tile edges: the FFMA kernels use 64 x 64 tiles and 128 (fp32) / 64 (fp64)
output features per CTA, the tensor-core kernels 128 rows x 64 columns, depth chunks of 128 and 128
features; the Gram path has register kernels up to 16 rows. bf16 / fp16 inputs use tensor cores from
d = 32 on. Tolerances: fp64 1e-12; fp32 2x torch's own fp32 error (at least 32 ulps); bf16 / fp16 two
ulps of the output type; the tensor-core median within 8 u / sqrt(d) (u: the 16-bit unit roundoff).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_within, far_from_zero_bf16_particles, relative_error, torch_error_in

import bmt_fast
from bmt_fast import _extension, reference

ROOT = Path(__file__).resolve().parents[1]
EMULATOR_SOURCE = ROOT / "csrc" / "cuda" / "emulation" / "emulated_ops.cpp"
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}
TENSOR_CORE_MIN_FEATURES = 32  # csrc/cuda/config.h


@dataclass(frozen=True)
class Target:
    name: str
    ops: object
    device: torch.device


def _ninja_directory() -> str | None:
    """Where `ninja` is: on PATH, or beside this Python (a virtual environment that is not activated)."""
    found = shutil.which("ninja")
    if found:
        return str(Path(found).parent)
    beside = Path(sys.executable).parent / "ninja"
    return str(beside.parent) if beside.is_file() else None


def _emulator_unavailable() -> str:
    if sys.platform != "linux":
        return "the CUDA emulator needs Linux (ucontext)"
    if not EMULATOR_SOURCE.is_file():
        return "csrc/cuda is not in this checkout"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    if _ninja_directory() is None:
        return "ninja is needed to build the emulator (pip install ninja)"
    return ""


@functools.cache
def _emulated_ops():
    """Builds the emulated ops once per session (about a minute on two cores)."""
    from torch.utils.cpp_extension import load

    ninja_dir = _ninja_directory()
    if shutil.which("ninja") is None:  # torch looks for ninja on PATH
        os.environ["PATH"] = ninja_dir + os.pathsep + os.environ.get("PATH", "")
    load(
        name="bmt_fast_cuda_emulated",
        sources=[str(EMULATOR_SOURCE)],
        extra_cflags=["-O2", "-std=c++20", "-DBMT_FAST_EMULATE"],
        is_python_module=False,
    )
    return torch.ops.bmt_fast_cuda_emulated


def _gpu_unavailable() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not _extension.CUDA.loaded:
        return f"bmt_fast._C_cuda is not loaded: {_extension.CUDA.reason}"
    return ""


@pytest.fixture(scope="module", params=["emulator", "gpu"])
def target(request) -> Target:
    if request.param == "gpu":
        reason = _gpu_unavailable()
        if reason:
            pytest.skip(reason)
        return Target("gpu", torch.ops.bmt_fast, torch.device("cuda"))
    reason = _emulator_unavailable()
    if reason:
        pytest.skip(reason)
    return Target("emulator", _emulated_ops(), torch.device("cpu"))


@pytest.fixture(scope="module")
def gpu() -> Target:
    reason = _gpu_unavailable()
    if reason:
        pytest.skip(reason)
    return Target("gpu", torch.ops.bmt_fast, torch.device("cuda"))


def gpu_only(target: Target) -> None:
    if target.name != "gpu":
        pytest.skip("large shape: GPU only (the emulator is slow)")


# ---- inputs and tolerances -------------------------------------------------------------------------


def particles(n, d, dtype, offset=0.0, scale=1.5):
    """x, score as `dtype` and their exact float64 values (the reference's input)."""
    x = (torch.randn(n, d, dtype=torch.float64) * scale + offset).to(dtype)
    score = torch.randn(n, d, dtype=torch.float64).to(dtype)
    return x, score, x.double(), score.double()


def as_h(value) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float64)


def check_close(actual, expected64, dtype, torch_fn=None, inputs64=()):
    """fp64: 1e-12. fp32: 2x torch's fp32 error (floor 32 ulps). bf16 / fp16: two ulps of the type."""
    assert actual.dtype == dtype, (actual.dtype, dtype)
    actual = actual.cpu()
    if dtype == torch.float64:
        assert relative_error(actual, expected64) < 1e-12
    elif dtype == torch.float32:
        assert_within(actual, expected64, torch_error_in(torch.float32, torch_fn, *inputs64))
    else:
        error = relative_error(actual, expected64)
        assert error <= 2 * HALF_ULP[dtype], f"relative error {error:.3e} > 2 ulps of {dtype}"


def svgd_reference(x64, s64, h=None):
    return reference.svgd_step(x64, s64, None if h is None else as_h(h))


def check_svgd(target, algorithm, n, d, dtype, bandwidth, offset=0.0):
    x, s, x64, s64 = particles(n, d, dtype, offset)
    h = None if bandwidth == "median" else bandwidth
    phi = target.ops.svgd_step(x.to(target.device), s.to(target.device), None if h is None else as_h(h).to(target.device),
                               algorithm)
    assert phi.shape == (n, d)
    shift = x64[:1]  # torch's fp32 yardstick measured near the origin, where it is fair

    def torch_fn(xx, ss):
        hh = reference.median_bandwidth(xx) if h is None else as_h(h).to(xx.dtype)
        return reference.svgd_step(xx - shift.to(xx.dtype), ss, hh)

    check_close(phi, svgd_reference(x64, s64, h), dtype, torch_fn, (x64, s64))


# ---- svgd_step -------------------------------------------------------------------------------------

TILED_SHAPES = [(1, 3), (7, 40), (65, 17), (130, 37), (70, 130)]
GRAM_SHAPES = [(1, 3), (3, 5), (8, 40), (16, 1000), (17, 33), (70, 20)]
CASES = [("tiled", n, d) for n, d in TILED_SHAPES] + [("gram", n, d) for n, d in GRAM_SHAPES]


@pytest.mark.parametrize("algorithm,n,d", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bandwidth", ["median", 3.0])
def test_svgd_step_matches_reference(target, algorithm, n, d, dtype, bandwidth):
    check_svgd(target, algorithm, n, d, dtype, bandwidth)


@pytest.mark.parametrize("algorithm,n,d", [("tiled", 70, 37), ("gram", 16, 1000), ("gram", 20, 50)])
def test_svgd_step_fp32_far_from_origin(target, algorithm, n, d):
    check_svgd(target, algorithm, n, d, torch.float32, "median", offset=1e4)


@pytest.mark.parametrize("n,kernels", [(5, "registers"), (16, "registers"), (16, "streamed"), (20, "registers")])
@pytest.mark.parametrize("outlier_row", ["first", "last"])
def test_gram_path_a_particle_far_from_a_tight_group_in_any_row(target, monkeypatch, n, kernels, outlier_row):
    """n particles of 1000 fp32 features, all but one within 1e-3 of each other and one ~3 away. The Gram
    kernels shift the rows by particle 0: with the outlier there, cancellation in |v_i|^2 + |v_j|^2 - 2 v_i.v_j
    had made H 3-32 % off and phi wrong by 0.3 (16 rows) to 7.9x its size (20 rows, the tile kernel), where
    the outlier in the last row gave 1e-3. Pairs that cancel now take direct differences (gram_repair_kernel):
    within 2x torch's own fp32 error in either order, in the median, rbf_kernel of one and of two sets, the
    step and a batch of steps."""
    monkeypatch.setenv("BMT_FAST_CUDA_GRAM", kernels)
    torch.manual_seed(7)
    d = 1000
    x = torch.randn(1, d, dtype=torch.float64) + 1e-3 * torch.randn(n, d, dtype=torch.float64) / d**0.5
    x[0] += 3 * torch.randn(d, dtype=torch.float64) / d**0.5
    order = torch.arange(n) if outlier_row == "first" else torch.roll(torch.arange(n), -1)
    x, score = x[order], torch.randn(n, d, dtype=torch.float64)
    h = reference.median_bandwidth(x)
    xf, sf = x.float(), score.float()
    on = target.device

    def within_torch(ours, torch_fp32, expected, floor):
        assert_within(ours.cpu(), expected, relative_error(torch_fp32, expected), floor)

    within_torch(target.ops.median_bandwidth(xf.to(on), "gram"), reference.median_bandwidth(xf), h, 1e-4)
    for a, b in ((xf, None), (xf[: n // 2], xf[n // 2 :])):  # the outlier is row 0 or row n-1 of G either way
        expected = reference.rbf_kernel(a.double(), None if b is None else b.double(), h)
        within_torch(target.ops.rbf_kernel(a.to(on), (a if b is None else b).to(on), h.to(on)),
                     reference.rbf_kernel(a, b, h.float()), expected, 1e-4)  # fmt: skip
    expected = reference.svgd_step(x, score, None)
    torch_fp32 = reference.svgd_step(xf, sf, None)
    within_torch(target.ops.svgd_step(xf.to(on), sf.to(on), None, "gram"), torch_fp32, expected, 1e-5)
    if n <= 16:  # the batched register kernels: the outlier layout beside its reverse
        xs, ss = torch.stack([xf, xf.flip(0)]).to(on), torch.stack([sf, sf.flip(0)]).to(on)
        out = torch.empty_like(xs)
        assert target.ops.svgd_step_batched_into(xs, ss, None, "auto", out=out).tolist() == [True, True]
        within_torch(out[0], torch_fp32, expected, 1e-5)
        within_torch(out[1], torch_fp32.flip(0), expected.flip(0), 1e-5)


@pytest.mark.parametrize("n,kernels", [(16, "registers"), (16, "streamed"), (100, "registers")])
def test_gram_step_does_not_depend_on_which_row_is_the_outlier(target, monkeypatch, n, kernels):
    """fp32, n - 1 particles within 1e-3 of each other and one 300 away (d = 256). The apply had shifted the
    rows by row 0: with the outlier there, the group's repulsion (2/H)(x - x_0) cancelled in fp32, phi 3.8e-2
    (16 rows) and 0.12 (100 rows, the cuBLAS apply) off, against 4e-7 and 3e-6 with the outlier last. The
    rows are now taken about their mean (as on the CPU): within 3x of each other in either order (the fp64
    Gram gives H to 1e-7; torch's own fp32 step is 8x off here: no yardstick)."""
    monkeypatch.setenv("BMT_FAST_CUDA_GRAM", kernels)
    torch.manual_seed(7)
    d = 256
    x = torch.randn(1, d, dtype=torch.float64) + 1e-3 * torch.randn(n, d, dtype=torch.float64) / d**0.5
    x[0] += 300 * torch.randn(d, dtype=torch.float64) / d**0.5
    score = torch.randn(n, d, dtype=torch.float64)
    errors = []
    for order in (torch.arange(n), torch.roll(torch.arange(n), -1)):  # the outlier first, then last
        xf, sf = x[order].float(), score[order].float()
        expected = reference.svgd_step(xf.double(), sf.double(), None)  # fp64 on the very fp32 inputs
        errors.append(relative_error(target.ops.svgd_step(xf.to(target.device), sf.to(target.device), None, "gram").cpu(), expected))
    first, last = errors
    assert max(first, last) < 1e-2 and first <= 3 * max(last, 1e-5), errors


LARGE_CASES = [("tiled", 2048, 128), ("tiled", 1000, 300), ("tiled", 4097, 64), ("auto", 16, 409_600),
               ("gram", 64, 100_003), ("gram", 3, 1_000_001), ("auto", 200, 5000)]


@pytest.mark.parametrize(
    "algorithm,n,d",
    # register Gram kernel (n <= 16), Gram weights + cuBLAS (17-256), FFMA tiles (fp32, d <= 256) or
    # cuBLAS row blocks (d > 256), mma tiles (bf16 / fp16)
    [("gram", 5, 40), ("gram", 20, 50), ("tiled", 70, 37), ("tiled", 70, 300)],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_svgd_step_with_a_tiny_bandwidth(target, algorithm, n, d, dtype):
    """A fixed H far below the squared distances (phi about score / n): a particle's own term k_ii = 1 is
    score_i, added exactly; folded into W = score - (2/H) xc it was (score_i - (2/H) xc_i) + (2/H) xc_i,
    two large terms that cancel (the CPU kernels, which folded it the same way, had an fp32 error of 0.6 at
    H = 1e-6)."""
    x, s, x64, s64 = particles(n, d, dtype, scale=10.0)
    h = as_h(1e-6)
    phi = target.ops.svgd_step(x.to(target.device), s.to(target.device), h.to(target.device), algorithm)
    bound = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 4 * HALF_ULP.get(dtype, 0.0))  # 2 ulps
    assert relative_error(phi.cpu(), svgd_reference(x64, s64, 1e-6)) <= bound


@pytest.mark.parametrize("algorithm,n,d", LARGE_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_svgd_step_large_shapes(target, algorithm, n, d, dtype):
    gpu_only(target)
    check_svgd(target, algorithm, n, d, dtype, "median")


@pytest.mark.parametrize("algorithm", ["tiled", "gram"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_particle_gives_its_score(target, algorithm, dtype):
    x, s, _, _ = particles(1, 40, dtype)
    for h in (None, as_h(0.5)):
        phi = target.ops.svgd_step(x.to(target.device), s.to(target.device), None if h is None else h.to(target.device),
                                   algorithm)
        torch.testing.assert_close(phi.cpu(), s)


@pytest.mark.parametrize("algorithm", ["tiled", "gram"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [5, 40])
def test_identical_particles_give_the_mean_score(target, algorithm, dtype, d):
    x = (torch.full((6, d), 0.1, dtype=torch.float64) + torch.arange(d, dtype=torch.float64)).to(dtype)
    s = torch.randn(6, d, dtype=torch.float64).to(dtype)
    h = target.ops.median_bandwidth(x.to(target.device), algorithm)
    assert math.isclose(float(h), reference.BANDWIDTH_FLOOR, rel_tol=1e-6)
    phi = target.ops.svgd_step(x.to(target.device), s.to(target.device), None, algorithm).cpu()
    assert torch.isfinite(phi).all()
    expected = s.double().mean(0, keepdim=True).expand_as(phi)
    assert relative_error(phi, expected) <= (1e-12 if dtype == torch.float64 else 2 * HALF_ULP.get(dtype, 2.0**-20))


@pytest.mark.parametrize("algorithm", ["tiled", "gram"])
def test_mostly_identical_particles_stay_finite(target, algorithm):
    x = torch.zeros(9, 40, dtype=torch.float64)
    x[7:] = torch.randn(2, 40, dtype=torch.float64)  # 49 of 81 pairs coincide: median 0, H at the floor
    phi = target.ops.svgd_step(x.to(target.device), torch.randn(9, 40, dtype=torch.float64).to(target.device), None,
                               algorithm)
    assert torch.isfinite(phi).all()


@pytest.mark.parametrize("n,d", [(70, 300), (130, 520)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("block_rows", [None, 64, 1])
def test_many_features_take_row_blocks(target, monkeypatch, n, d, dtype, block_rows):
    """fp32 / fp64 with d > 256 on the tiled path: blocks of rows (S = xc_I xc^T, K in place, K W) in a
    workspace of one block; the emulator's workspace setting forces 64-row and 1-row blocks."""
    if block_rows is not None:
        if target.name != "emulator":
            pytest.skip("the workspace size is the emulator's setting")
        monkeypatch.setenv("BMT_FAST_EMULATE_WORKSPACE_BYTES", str(block_rows * n * dtype.itemsize))
    for bandwidth in ("median", 3.0):
        check_svgd(target, "tiled", n, d, dtype, bandwidth)
    x, s, _, _ = particles(n, d, dtype)
    phi = target.ops.svgd_step(x.to(target.device), s.to(target.device), as_h(-1.0).to(target.device), "tiled")
    assert torch.isnan(phi).all()


# rbf_kernel(x, score) below: n + n rows, the Gram path up to 256 rows, the tiled one beyond
@pytest.mark.parametrize("algorithm,n,d", [("tiled", 130, 37), ("tiled", 130, 5), ("gram", 8, 40), ("gram", 20, 50)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bad", [-1.0, 0.0, math.nan, math.inf])
def test_invalid_bandwidth_gives_nan_not_a_wrong_answer(target, algorithm, n, d, dtype, bad):
    """No host synchronisation reads H back: an invalid H makes every entry NaN (the Python API raises first)."""
    x, s, _, _ = particles(n, d, dtype)
    phi = target.ops.svgd_step(x.to(target.device), s.to(target.device), as_h(bad).to(target.device), algorithm)
    assert torch.isnan(phi).all()
    k = target.ops.rbf_kernel(x.to(target.device), s.to(target.device), as_h(bad).to(target.device))
    assert torch.isnan(k).all()


@pytest.mark.parametrize("dtype,d", [(torch.float32, 5), (torch.bfloat16, 40)], ids=str)
@pytest.mark.parametrize("bad", [-1.0, 0.0, math.nan, math.inf])
def test_invalid_bandwidth_gives_a_nan_diagonal_too(target, dtype, d, bad):
    """rbf_kernel(x, x) of 260 particles (the tiled kernels, FFMA and tensor cores): its unit diagonal is
    exp(-0 / H), NaN for an invalid H as the reference's; it had stayed 1 beside a NaN everywhere else."""
    x = particles(260, d, dtype)[0].to(target.device)
    k = target.ops.rbf_kernel(x, x, as_h(bad).to(target.device))
    assert torch.isnan(k).all()


@pytest.mark.parametrize("dtype,d", [(torch.float32, 5), (torch.bfloat16, 40), (torch.float16, 40)], ids=str)
def test_a_bandwidth_past_float32s_range(target, dtype, d):
    """A float64 H of 1e39 is valid (K = 1 to fp32's precision); the fp32 kernels' cast had made it +inf, which
    they take for an invalid H: phi and K all NaN. Now as the reference, in svgd_step (tiled) and rbf_kernel
    (tiled: 260 rows)."""
    x, s, x64, s64 = particles(260, d, dtype)
    h = as_h(1e39)
    phi = target.ops.svgd_step(x.to(target.device), s.to(target.device), h.to(target.device), "tiled").cpu()
    check_close(phi, svgd_reference(x64, s64, 1e39), dtype, lambda xx, ss: svgd_reference(xx, ss, 1e39), (x64, s64))
    k = target.ops.rbf_kernel(x.to(target.device), x.to(target.device), h.to(target.device)).cpu()
    assert (k == 1).all()


@pytest.mark.parametrize("self_kernel", [True, False])
def test_bf16_kernel_and_median_of_tight_clusters_far_apart_on_tensor_cores(target, self_kernel):
    """bf16 particles in two clusters 0.05 wide whose centres are drawn N(0, 10^2) per feature, H from the
    distances within a cluster (260 rows: the tensor-core tiles). Their distances multiply the particles
    shifted exactly (exact_bf16_shift: every x - shift a bf16 value, for x and y alike), where x - mean
    rounded to bf16 had lost their low bits: K 4.5e-2 off; now within bf16's rounding of K's entries. The
    median of all pairs as the reference's. (The step: test_bf16_step_splits_w_for_particles_far_apart.)"""
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(2, 64, generator=generator, dtype=torch.float64) * 10
    x = (centres[torch.arange(260) % 2] + 0.05 * torch.randn(260, 64, generator=generator, dtype=torch.float64)).bfloat16()
    y = x if self_kernel else x[torch.randperm(260, generator=generator)][:200].clone()
    same = x[0::2].double()
    h = torch.cdist(same, same).square().median()
    k = target.ops.rbf_kernel(x.to(target.device), y.to(target.device), as_h(float(h)).to(target.device)).cpu()
    assert relative_error(k, reference.rbf_kernel(x.double(), y.double(), h)) <= HALF_ULP[torch.bfloat16]
    median = target.ops.median_bandwidth(x.to(target.device), "tiled").cpu()
    assert abs(float(median) / float(reference.median_bandwidth(x.double())) - 1) <= 1e-5


@pytest.mark.parametrize("d", [64, 200, 300])  # one, two and three depth chunks of 128 features
@pytest.mark.parametrize("case", ["clusters", "copies"])
def test_bf16_step_splits_w_for_particles_far_apart(target, d, case):
    """bf16 particles spread more than 8 sqrt(H) around their mean (260 rows: the tensor-core tiles): two
    clusters 0.05 wide whose centres are drawn N(0, 10^2) per feature with H from the distances within a
    cluster, and copies of four points with H = (spread / 9)^2. The step multiplies K by score and by the
    exactly shifted particles apart (K' = -(2/H) K rounded, its row sums per feature chunk, the chunks of the
    distances ordered to end on the CTA's own features); folded into W = score - (2/H) xc (one bf16 operand)
    phi was 3.3e-2 - 7.5e-2 off here; now 2.0e-3 - 4.4e-3 (emulator), within bf16's rounding."""
    generator = torch.Generator().manual_seed(3)
    if case == "clusters":
        centres = torch.randn(2, d, generator=generator, dtype=torch.float64) * 10
        x64 = centres[torch.arange(260) % 2] + 0.05 * torch.randn(260, d, generator=generator, dtype=torch.float64)
        same = x64.bfloat16()[0::2].double()
        h = float(torch.cdist(same, same).square().median())
    else:
        x64 = torch.randn(4, d, generator=generator, dtype=torch.float64)[torch.arange(260) % 4]
        h = (float((x64.bfloat16().double() - x64.bfloat16().double().mean(0)).abs().max()) / 9) ** 2
    x = x64.bfloat16()
    score = torch.randn(260, d, generator=generator, dtype=torch.float64).bfloat16()
    phi = target.ops.svgd_step(x.to(target.device), score.to(target.device), as_h(h).to(target.device), "tiled").cpu()
    assert phi.dtype == torch.bfloat16
    assert relative_error(phi, svgd_reference(x.double(), score.double(), h)) <= 2 * HALF_ULP[torch.bfloat16]


@pytest.mark.parametrize("case", ["outlier", "range"])
def test_bf16_particles_without_a_well_conditioned_exact_shift(target, case):
    """Columns with no exact bf16 shift that keeps the expansion well conditioned take the mean, as before the
    exact shifts (helpers.far_from_zero_bf16_particles): a shift of 0 there had left K 9.4e-2 off (outlier)
    and K, the median and phi NaN (range) on the tensor-core tiles; now within bf16's rounding."""
    x = far_from_zero_bf16_particles()[case]
    score = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    h = reference.median_bandwidth(x.double())
    on = target.device
    k = target.ops.rbf_kernel(x.to(on), x.to(on), h.to(on)).cpu()
    assert relative_error(k, reference.rbf_kernel(x.double(), x.double(), h)) <= 2 * HALF_ULP[torch.bfloat16]
    median = target.ops.median_bandwidth(x.to(on), "tiled").cpu()
    assert abs(float(median) / float(h) - 1) <= 2e-3
    phi = target.ops.svgd_step(x.to(on), score.to(on), None, "tiled").cpu()
    assert relative_error(phi, svgd_reference(x.double(), score.double())) <= 4 * HALF_ULP[torch.bfloat16]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_fp16_tensor_cores_keep_a_bad_score_in_its_column(target, bad):
    """fp16 on the tensor-core path scales W by a power of two from max |W|: a NaN or Inf score had made that
    scale NaN or 0 and all of phi non-finite. Now the reference's: its column only."""
    x, s, x64, s64 = particles(20, 40, torch.float16)
    s[3, 7] = bad
    phi = target.ops.svgd_step(x.to(target.device), s.to(target.device), None, "tiled").cpu()
    expected = svgd_reference(x64, s.double())
    assert not torch.isfinite(phi[:, 7]).any()
    keep = torch.arange(40) != 7
    assert relative_error(phi[:, keep], expected[:, keep]) <= 2 * HALF_ULP[torch.float16]


def test_fp16_particles_whose_centred_values_pass_65504(target):
    """fp16 particles spanning more than fp16's range once centred (x_0 near -35000, the others near +35000:
    all finite): the tensor-core operands had rounded them to Inf, and H, phi and K came out NaN. The operands
    are now scaled by a power of two (1/4 here) that the bandwidth follows."""
    torch.manual_seed(3)
    n, d = 20, 32
    x64 = 35000.0 + 400.0 * torch.randn(n, d, dtype=torch.float64)
    x64[0] -= 70000.0
    x = x64.to(torch.float16)
    x64 = x.double()
    s = torch.randn(n, d, dtype=torch.float64).to(torch.float16)
    on = target.device
    # The group lies ~3500 from the mean (the outlier pulls it), where fp16 keeps steps of 2 after the scale:
    # each centred value is off by up to 1 of the group's ~560 apart, 1e-3 of a distance, ~3e-4 over 32.
    h = target.ops.median_bandwidth(x.to(on), "tiled").cpu()
    assert relative_error(h, reference.median_bandwidth(x64)) <= 1e-3
    phi = target.ops.svgd_step(x.to(on), s.to(on), None, "tiled").cpu()
    assert relative_error(phi, svgd_reference(x64, s.double())) <= 2 * HALF_ULP[torch.float16]
    big = torch.cat([x, x[1:].repeat(13, 1)])  # 267 rows: the tiled rbf_kernel
    k = target.ops.rbf_kernel(big.to(on), big.to(on), as_h(1e7).to(on)).cpu()
    assert relative_error(k, reference.rbf_kernel(big.double(), None, as_h(1e7))) <= 2 * HALF_ULP[torch.float16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [40, 200])
def test_tensor_core_kernels_keep_to_the_devices_shared_memory(target, monkeypatch, dtype, d):
    """Devices of compute capability 8.6 / 8.9 (RTX 30 / 40, A10, L4, L40) let a block have 99 KB of shared
    memory: the tensor-core svgd_step kernel (105-139 KB), and from 129 features the median and rbf_kernel
    ones, do not fit there (the launch had failed). The FFMA kernels take their place, with the same results;
    on the emulator the limit is its setting, on a GPU the device's."""
    if target.name != "emulator":
        pytest.skip("the shared memory limit is the emulator's setting")
    limit = 99 * 1024
    monkeypatch.setenv("BMT_FAST_EMULATE_MAX_SHARED_BYTES", str(limit))
    target.ops.take_launches()
    check_svgd(target, "tiled", 260, d, dtype, "median")
    x, _, x64, _ = particles(260, d, dtype)
    k = target.ops.rbf_kernel(x, x, as_h(2.0 * d))
    assert relative_error(k, reference.rbf_kernel(x64, None, as_h(2.0 * d))) <= 2 * HALF_ULP[dtype]
    launches = target.ops.take_launches()
    assert launches and max(launches) <= limit, launches


def test_features_beyond_the_tensor_core_grid_take_the_gram_path(target, monkeypatch):
    """bf16 / fp16 steps of more than 256 particles put a CTA row per 128 features in the grid's y extent,
    at most 65,535: past 8,388,480 features the launch had been refused, naming algorithm="gram", which the
    public op cannot pass. auto now takes the Gram path there (up to 4,096 particles); "tiled" says why not.
    The emulator stands for such a d by its limit on the chunks (2 here: 257 features take 3)."""
    if target.name != "emulator":
        pytest.skip("the chunk limit is the emulator's setting")
    monkeypatch.setenv("BMT_FAST_EMULATE_MAX_FEATURE_CHUNKS", "2")
    check_svgd(target, "auto", 260, 257, torch.bfloat16, "median")
    check_svgd(target, "auto", 260, 256, torch.float16, 300.0)  # 2 chunks: still the tensor cores
    x, s, _, _ = particles(260, 257, torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"the tensor-core step takes at most 256 features, got 257; use algorithm=\"gram\""):
        target.ops.svgd_step(x, s, None, "tiled")


# ---- svgd_step_into: phi into out, and whether it is all finite ------------------------------------


@pytest.mark.parametrize(
    "algorithm,n,d",
    [("gram", 1, 3), ("gram", 5, 37), ("gram", 16, 300), ("gram", 17, 33), ("tiled", 7, 40)],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_svgd_step_into_writes_phi_and_flags_non_finite(target, algorithm, n, d, dtype):
    """out receives svgd_step's phi bit for bit; the 0-dim bool flag equals isfinite(phi).all(): written by
    the register kernels as they store phi (Gram path, n <= 16), by a scan elsewhere (n = 17: cuBLAS apply;
    tiled). A NaN/Inf at the shift row x_0, the last value and the middle, in x and in score, with the
    median rule and with a given H."""
    torch.manual_seed(n * d)
    x, s, _, _ = particles(n, d, dtype)
    x, s = x.to(target.device), s.to(target.device)
    for h in (None, as_h(0.5).to(target.device)):
        out = torch.full_like(x, 7.0)
        finite = target.ops.svgd_step_into(x, s, h, algorithm, out=out)
        assert finite.dtype == torch.bool and finite.shape == () and finite.device == x.device
        assert bool(finite)
        # bit for bit in the emulator; on a GPU the split-K Gram sums are float64 atomics, whose order (and
        # so the last bits of phi) may differ from call to call
        exact = {"rtol": 0, "atol": 0} if target.name == "emulator" else {}
        torch.testing.assert_close(out, target.ops.svgd_step(x, s, h, algorithm), **exact)
        for which in (0, 1):
            for (i, k), bad in zip([(0, 0), (n - 1, d - 1), (n // 2, d // 2)], [math.nan, math.inf, -math.inf]):
                xb, sb = x.clone(), s.clone()
                (xb, sb)[which][i, k] = bad
                assert not bool(target.ops.svgd_step_into(xb, sb, h, algorithm, out=out)), (which, i, k, bad, h)
                assert not bool(torch.isfinite(out).all())


@pytest.mark.parametrize("kernels", ["registers", "streamed"])
@pytest.mark.parametrize("n,d", [(1, 8), (5, 40), (16, 520), (17, 24)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_svgd_step_batched_into_is_each_sets_step(target, monkeypatch, kernels, n, d, dtype):
    """svgd_step_batched_into: each set's phi and flag as svgd_step_into gives them (bit for bit in the
    emulator, where the CTAs of a set are its single call's; 16 x 520 fp32: two Gram CTAs a set), a NaN in one
    set's score flagging that set only, the median rule and one H per set. Up to 16 particles the register
    (or streamed) kernels take all sets in one Gram, one repair and one apply launch (emulator: 5 sets at
    most 2 a launch: three of each), from 17 particles one set after another."""
    if kernels == "streamed" and (dtype == torch.float64 or (d * dtype.itemsize) % 16):
        pytest.skip("the streamed kernels take fp32 compute types and 16-byte rows")
    monkeypatch.setenv("BMT_FAST_CUDA_GRAM", kernels)
    if target.name == "emulator":
        monkeypatch.setenv("BMT_FAST_EMULATE_MAX_SETS", "2")
    torch.manual_seed(n * d)
    sets = 5
    x = (torch.randn(sets, n, d, dtype=torch.float64) * 1.5).to(dtype).to(target.device)
    s = torch.randn(sets, n, d, dtype=torch.float64).to(dtype).to(target.device)
    s[3, n - 1, d // 2] = math.nan
    h = torch.tensor([0.5, 4.0, 40.0, 9.0, 2.0], dtype=torch.float64, device=target.device) * d / 8
    exact = {"rtol": 0, "atol": 0} if target.name == "emulator" else {}
    for bandwidth in (None, h):
        if target.name == "emulator":  # the launches of one set's svgd_step_into
            target.ops.take_launches()
            target.ops.svgd_step_into(x[0], s[0], None if bandwidth is None else h[0], "auto", out=torch.empty_like(x[0]))
            single_launches = len(target.ops.take_launches())
        out = torch.full_like(x, 7.0)
        flags = target.ops.svgd_step_batched_into(x, s, bandwidth, "auto", out=out)
        assert flags.dtype == torch.bool and flags.shape == (sets,) and flags.device == x.device
        assert flags.tolist() == [True, True, True, False, True]
        if target.name == "emulator":
            record = target.ops.take_launches()
            if n <= 16:
                assert single_launches == 3 and len(record) == 9, record
                assert sum(size == STREAM_SHARED_BYTES for size in record) == (6 if kernels == "streamed" else 0)
            else:
                assert single_launches > 3 and len(record) == sets * single_launches, record
        for i in range(sets):
            single = torch.empty_like(x[i])
            flag = target.ops.svgd_step_into(x[i], s[i], None if bandwidth is None else h[i], "auto", out=single)
            assert bool(flag) == (i != 3)
            torch.testing.assert_close(out[i], single, equal_nan=True, **exact)
        assert torch.isnan(out[3, :, d // 2]).all()


@pytest.mark.parametrize("batched", [False, True])
def test_a_bandwidth_that_is_a_view_of_out(target, batched):
    """H given as a view of `out`: the kernels read it while other thread blocks write phi there (phi had been
    NaN past the first 512 columns, a batch's later sets wrong); it is read from a copy now, as the CPU reads
    it before writing."""
    sets, n, d = (3, 4, 1100) if batched else (1, 4, 1100)
    x, s, x64, s64 = particles(sets * n, d, torch.float64)
    x, s = x.reshape(sets, n, d).to(target.device), s.reshape(sets, n, d).to(target.device)
    out = torch.zeros(sets, n, d, dtype=torch.float64, device=target.device)
    hs = [2.0 * d, 3.0 * d, 4.0 * d][:sets]  # near the squared distances: another H gives another phi
    out.view(-1)[:sets] = torch.tensor(hs, dtype=torch.float64)
    h = out.view(-1)[:sets]
    expected = [svgd_reference(x64.reshape(sets, n, d)[i], s64.reshape(sets, n, d)[i], hs[i]) for i in range(sets)]
    if batched:
        assert target.ops.svgd_step_batched_into(x, s, h, "gram", out=out).tolist() == [True] * sets
    else:
        assert bool(target.ops.svgd_step_into(x[0], s[0], h.reshape(()), "gram", out=out[0]))
    for i in range(sets):
        assert relative_error(out[i].cpu(), expected[i]) < 1e-12


def test_batched_steps_are_single_steps_when_pairs_cancel(target, monkeypatch):
    """The repair of cancelled pairs splits its sums over the columns by the set's shape alone: a batch's
    phi stays each set's single call's, bit for bit on the emulator (its slices had depended on the number of
    sets: 1.9e-6 apart)."""
    if target.name == "emulator":
        monkeypatch.setenv("BMT_FAST_EMULATE_SMS", "2")
    torch.manual_seed(11)
    sets, n, d = 4, 3, 4100
    x = torch.randn(sets, n, d, dtype=torch.float64) * 1e-3
    x[:, 0] += 30.0  # particle 0 far from the others: their pairs cancel
    x, s = x.float().to(target.device), torch.randn(sets, n, d).to(target.device)
    out = torch.empty_like(x)
    assert target.ops.svgd_step_batched_into(x, s, None, "auto", out=out).tolist() == [True] * sets
    exact = {"rtol": 0, "atol": 0} if target.name == "emulator" else {}
    for i in range(sets):
        single = torch.empty_like(x[i])
        assert bool(target.ops.svgd_step_into(x[i], s[i], None, "auto", out=single))
        torch.testing.assert_close(out[i], single, **exact)


@pytest.mark.parametrize("algorithm", ["gram", "tiled"])
def test_svgd_step_into_flags_values_that_overflow_float16(target, algorithm):
    """fp16 accumulates in fp32: a phi value finite in fp32 but past 65504 is stored as Inf, and flagged."""
    x = torch.zeros(2, 3, dtype=torch.float64)
    x[1, 0] = 1e-5  # 1e-5 apart at H = 2e-10: the repulsion pushes phi past fp16's range
    score = torch.full((2, 3), 6e4, dtype=torch.float64)
    h = as_h(2e-10).to(target.device)
    wide = torch.empty(2, 3, device=target.device)
    assert bool(target.ops.svgd_step_into(x.float().to(target.device), score.float().to(target.device), h, algorithm,
                                          out=wide))
    assert float(wide.abs().max()) > 65520
    out = torch.empty(2, 3, dtype=torch.float16, device=target.device)
    assert not bool(target.ops.svgd_step_into(x.half().to(target.device), score.half().to(target.device), h,
                                              algorithm, out=out))
    assert bool(torch.isinf(out).any()) and not bool(torch.isnan(out).any())


# ---- median_bandwidth ------------------------------------------------------------------------------


def numpy_rule(x: torch.Tensor) -> float:
    a = x.double().cpu().numpy()
    d2 = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    return max(float(np.median(d2)) / math.log(len(a) + 1), reference.BANDWIDTH_FLOOR)


def median_tolerance(algorithm, dtype, d):
    if dtype == torch.float64:
        return 1e-12
    if algorithm == "tiled" and dtype in UNIT_ROUNDOFF and d >= TENSOR_CORE_MIN_FEATURES:
        # exact selection over distances of the centred particles rounded to 16 bits: the emulator measured
        # at most 6.2 u / sqrt(d) over 480 Gaussian clouds (n = 2 .. 65, d = 32 .. 128; small n is worst)
        return 8 * UNIT_ROUNDOFF[dtype] / math.sqrt(d)
    return 1e-5


@pytest.mark.parametrize("algorithm", ["tiled", "gram"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 10, 65, 130])
@pytest.mark.parametrize("d", [9, 40])
def test_median_bandwidth_matches_numpy(target, algorithm, dtype, n, d):
    x = (torch.randn(n, d, dtype=torch.float64) * 2 + 10).to(dtype)
    h = target.ops.median_bandwidth(x.to(target.device), algorithm)
    assert h.dim() == 0 and h.dtype == reference.accumulation_dtype(dtype)
    assert math.isclose(float(h), numpy_rule(x), rel_tol=median_tolerance(algorithm, dtype, d))


@pytest.mark.parametrize("algorithm", ["tiled", "gram"])
def test_median_with_ties_and_duplicates(target, algorithm):
    x = torch.tensor([[0.0], [0.0], [1.0], [1.0], [3.0]], dtype=torch.float64)
    h = target.ops.median_bandwidth(x.to(target.device), algorithm)
    assert math.isclose(float(h), numpy_rule(x), rel_tol=1e-12)


@pytest.mark.parametrize("algorithm", ["tiled", "gram"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 5, 20, 70])
def test_median_of_particles_with_nan_or_inf_is_nan(target, algorithm, dtype, n):
    """A NaN or an infinity in the particles (at x_0, the Gram path's shift, the last value or the middle) makes
    H NaN, as the reference's and the CPU's, on the Gram path (its diagonal; by ranks up to 16 rows, radix
    beyond) and on the FFMA and tensor-core tiles (d = 40: bf16 / fp16 on tensor cores); a clamp of NaN
    distances at 0 and the keys' order had given the floor or a finite median. K for that H, and the step's
    phi by the median rule (the register kernels up to 16 rows derive H themselves), are all NaN."""
    d = 40
    x = torch.randn(n, d, dtype=torch.float64).to(dtype).to(target.device)
    score = torch.randn(n, d, dtype=torch.float64).to(dtype).to(target.device)
    assert math.isfinite(float(target.ops.median_bandwidth(x, algorithm)))
    for (i, k), bad in itertools.product([(0, 0), (n - 1, d - 1), (n // 2, d // 2)], [math.nan, math.inf, -math.inf]):
        xb = x.clone()
        xb[i, k] = bad
        h = target.ops.median_bandwidth(xb, algorithm)
        assert h.dtype == reference.accumulation_dtype(dtype) and math.isnan(float(h)), (i, k, bad, float(h))
        assert torch.isnan(target.ops.rbf_kernel(xb, xb, h)).all()
        assert torch.isnan(target.ops.svgd_step(xb, score, None, algorithm)).all(), (i, k, bad)


@pytest.mark.parametrize("algorithm", ["tiled", "gram"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [5, 20, 70])
def test_nan_particle_with_given_bandwidth_gives_nan(target, algorithm, dtype, n):
    """A particle holding a NaN with a given H (the ops do not scan x): phi all NaN and K's entries of its pairs
    NaN, as the reference's, on the Gram path (register kernels up to 16 rows, weights beyond) and the FFMA and
    tensor-core tiles; the clamps of the distances at 0 had made its entries of K 1 and phi NaN in one column."""
    d = 40
    x = torch.randn(n, d, dtype=torch.float64)
    x[n // 2, 7] = math.nan
    x = x.to(dtype).to(target.device)
    score = torch.randn(n, d, dtype=torch.float64).to(dtype).to(target.device)
    h = torch.tensor(30.0, device=target.device)
    assert torch.isnan(target.ops.svgd_step(x, score, h, algorithm)).all()
    k = target.ops.rbf_kernel(x, x, h)
    off = torch.arange(n, device=target.device) != n // 2
    assert torch.isnan(k[n // 2, off]).all() and torch.isnan(k[off, n // 2]).all()
    y = torch.randn(9, d, dtype=torch.float64).to(dtype).to(target.device)
    assert torch.isnan(target.ops.rbf_kernel(x, y, h)[n // 2]).all()
    assert torch.isnan(target.ops.rbf_kernel(y, x, h)[:, n // 2]).all()


@pytest.mark.parametrize("n,d", [(4096, 32), (3000, 130)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_median_bandwidth_large(target, n, d, dtype):
    gpu_only(target)
    x = torch.randn(n, d, dtype=torch.float64).to(dtype)
    expected = float(reference.median_bandwidth(x.double().to(target.device)))
    h = float(target.ops.median_bandwidth(x.to(target.device), "tiled"))
    assert math.isclose(h, expected, rel_tol=median_tolerance("tiled", dtype, d))


# ---- rbf_kernel ------------------------------------------------------------------------------------

# (n, m, d, self): the Gram path while n + m <= 256 (n for the self kernel), the tiled one beyond
RBF_CASES = [(5, 7, 3, False), (1, 16, 5000, False), (20, 20, 6, True), (200, 100, 7, False), (300, 300, 9, True),
             (150, 130, 140, False), (140, 140, 40, True)]


def rbf_inputs(n, m, d, self_kernel, dtype):
    x = torch.randn(n, d, dtype=torch.float64).to(dtype)
    y = x if self_kernel else (torch.randn(m, d, dtype=torch.float64) + 0.5).to(dtype)
    return x, y


@pytest.mark.parametrize("n,m,d,self_kernel", RBF_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rbf_kernel_matches_reference(target, n, m, d, self_kernel, dtype):
    x, y = rbf_inputs(n, m, d, self_kernel, dtype)
    h = as_h(d)
    xd = x.to(target.device)
    k = target.ops.rbf_kernel(xd, xd if self_kernel else y.to(target.device), h.to(target.device))
    assert k.shape == (n, m)
    expected = reference.rbf_kernel(x.double(), None if self_kernel else y.double(), h)

    def torch_fn(a, b):
        return reference.rbf_kernel(a - x.double()[:1].to(a.dtype), None if self_kernel else b - x.double()[:1].to(a.dtype),
                                    h.to(a.dtype))

    check_close(k, expected, dtype, torch_fn, (x.double(), y.double()))
    if self_kernel:
        assert torch.equal(k.diagonal().cpu(), torch.ones(n, dtype=dtype))
        torch.testing.assert_close(k.cpu(), k.cpu().T)


@pytest.mark.parametrize("n,m,d", [(1, 16, 409_600), (1000, 700, 64), (600, 500, 300)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rbf_kernel_large(target, n, m, d, dtype):
    gpu_only(target)
    x, y = rbf_inputs(n, m, d, False, dtype)
    h = as_h(d)
    k = target.ops.rbf_kernel(x.to(target.device), y.to(target.device), h.to(target.device))
    check_close(k, reference.rbf_kernel(x.double(), y.double(), h), dtype,
                lambda a, b: reference.rbf_kernel(a - x.double()[:1].to(a.dtype), b - x.double()[:1].to(a.dtype), h.to(a.dtype)),
                (x.double(), y.double()))


@pytest.mark.parametrize("n,m,d", [(5, 7, 3), (30, 20, 10), (300, 200, 9), (2, 3, 20_000)])
def test_rbf_kernel_backward_matches_autograd(target, n, m, d):
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    h = torch.tensor(float(d) / 2, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(n, m, dtype=torch.float64)
    expected = torch.autograd.grad((reference.rbf_kernel(x, y, h) * weights).sum(), (x, y, h))
    dev = target.device
    k = target.ops.rbf_kernel(x.detach().to(dev), y.detach().to(dev), h.detach().to(dev))
    args = (weights.to(dev), x.detach().to(dev), y.detach().to(dev), k, h.detach().to(dev))
    grads = target.ops.rbf_kernel_backward(*args, [True, True, True])
    for g, e in zip(grads, expected):
        assert g.shape == e.shape
        assert relative_error(g.cpu(), e) < 1e-10
    for mask in ([True, False, False], [False, True, False], [False, False, True]):  # only what is asked for
        masked = target.ops.rbf_kernel_backward(*args, mask)
        for wanted, g, e in zip(mask, masked, expected):
            assert (g is None) != wanted
            if wanted:
                assert relative_error(g.cpu(), e) < 1e-10


def test_rbf_kernel_backward_of_a_self_kernel_with_tiny_values(target):
    """y is x: the own terms P_ii (x_i - x_i) = 0 are left out, as on the CPU; with a small H they sat
    beside K_ij ~ 1e-14 in the fp32 sums and the gradients lost every other term."""
    torch.manual_seed(4)
    x = torch.randn(300, 40, dtype=torch.float64).float()
    h = torch.tensor(float(torch.cdist(x.double(), x.double()).square().median()) / 87)
    k = reference.rbf_kernel(x.double(), None, h.double()).float()
    grad = torch.randn_like(k)
    dev = target.device
    xd = x.to(dev)
    gx, gy, _ = target.ops.rbf_kernel_backward(grad.to(dev), xd, xd, k.to(dev), h.to(dev), [True, True, False])
    p = (grad.double() * k.double()).fill_diagonal_(0)
    x64 = x.double()
    assert relative_error(gx.cpu(), -2 / float(h) * (p.sum(1, keepdim=True) * x64 - p @ x64)) < 1e-5
    assert relative_error(gy.cpu(), -2 / float(h) * (p.sum(0).unsqueeze(1) * x64 - p.T @ x64)) < 1e-5


# ---- argument checks -------------------------------------------------------------------------------


def test_direct_op_calls_check_arguments(target):
    dev = target.device
    x = torch.randn(4, 3, device=dev)
    with pytest.raises(RuntimeError, match="score must have the shape of x"):
        target.ops.svgd_step(x, torch.randn(4, 2, device=dev), None)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        target.ops.svgd_step(torch.randn(4, device=dev), torch.randn(4, device=dev), None)
    with pytest.raises(RuntimeError, match="score must have the dtype of x"):
        target.ops.svgd_step(x, x.double(), None)
    with pytest.raises(RuntimeError, match='algorithm must be "auto", "tiled" or "gram"'):
        target.ops.svgd_step(x, x, None, "fast")
    with pytest.raises(RuntimeError, match="bandwidth must hold one value"):
        target.ops.svgd_step(x, x, torch.ones(2, device=dev))
    with pytest.raises(RuntimeError, match="y must have d = 3 columns"):
        target.ops.rbf_kernel(x, torch.randn(2, 4, device=dev), torch.tensor(1.0, device=dev))
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16"):
        target.ops.median_bandwidth(torch.ones(4, 3, dtype=torch.int32, device=dev))
    with pytest.raises(RuntimeError, match="kernel must have shape"):
        target.ops.rbf_kernel_backward(torch.randn(4, 2, device=dev), x, torch.randn(2, 3, device=dev),
                                       torch.randn(3, 2, device=dev), torch.tensor(1.0, device=dev), [True] * 3)


@pytest.mark.parametrize("sms", [1, 3])
@pytest.mark.parametrize("n", [3, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_register_kernels_loop_over_many_column_passes(target, monkeypatch, sms, n, dtype):
    """The Gram path's register kernels launch one wave (CTAs per SM x SMs) and loop over the columns: with
    1 or 3 emulated SMs each thread takes several passes, the last one ragged."""
    if target.name != "emulator":
        pytest.skip("emulator only (the SM count is the emulator's setting)")
    monkeypatch.setenv("BMT_FAST_EMULATE_SMS", str(sms))
    check_svgd(target, "gram", n, 2100, dtype, "median")
    x, s, _, _ = particles(n, 2100, dtype)
    out = torch.empty_like(x)
    assert bool(target.ops.svgd_step_into(x, s, None, "gram", out=out))
    s[n - 1, 2099] = math.inf
    assert not bool(target.ops.svgd_step_into(x, s, None, "gram", out=out))


# ---- the streamed prompt-regime kernels (BMT_FAST_CUDA_GRAM=streamed) -------------------------------

STREAM_SHARED_BYTES = 192 * 1024  # csrc/cuda/gram.cuh: kStreamSharedBytes, the streamed kernels' launches


def streamed_launches(target: Target) -> int:
    """How many launches since the last call were of the streamed kernels (emulator: by their shared memory)."""
    return sum(1 for size in target.ops.take_launches() if size == STREAM_SHARED_BYTES)


@pytest.mark.parametrize("sms", [1, 3])
@pytest.mark.parametrize("n,d", [(16, 4000), (5, 1000), (8, 40), (3, 4104), (1, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_streamed_kernels_match_the_reference(target, monkeypatch, sms, n, d, dtype):
    """The streamed Gram and apply kernels: each CTA's equal share of whole 16-byte pieces, chunks through a
    ring of shared stages (16 x 4000 fp32 on one SM: 8 Gram chunks through 6 stages, 8 apply chunks through
    3, the last one ragged), into the same phi as the reference; svgd_step_into's flag; the median from
    their G."""
    monkeypatch.setenv("BMT_FAST_CUDA_GRAM", "streamed")
    if target.name == "emulator":
        monkeypatch.setenv("BMT_FAST_EMULATE_SMS", str(sms))
        target.ops.take_launches()
    elif sms != 1:
        pytest.skip("the SM count is the emulator's setting")
    check_svgd(target, "gram", n, d, dtype, "median")
    x, s, x64, _ = particles(n, d, dtype)
    x, s = x.to(target.device), s.to(target.device)
    out = torch.empty_like(x)
    assert bool(target.ops.svgd_step_into(x, s, as_h(2.0).to(target.device), "gram", out=out))
    s[n - 1, d - 1] = math.nan
    assert not bool(target.ops.svgd_step_into(x, s, None, "gram", out=out))
    # a NaN score reaches every row of its column (through K), no other column
    assert torch.isnan(out[:, d - 1]).all() and torch.isfinite(out[:, : d - 1]).all()
    if n > 1:
        h = float(target.ops.median_bandwidth(x, "gram"))
        assert math.isclose(h, float(reference.median_bandwidth(x64)), rel_tol=1e-5)
    if target.name == "emulator":  # Gram + apply per step (svgd_step, twice svgd_step_into), Gram (median)
        assert streamed_launches(target) == 6 + (n > 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streamed_rbf_kernel_of_two_sets(target, monkeypatch, dtype):
    """rbf_kernel(x, y) on the Gram path with n + m <= 16 streams the rows of both sets."""
    monkeypatch.setenv("BMT_FAST_CUDA_GRAM", "streamed")
    if target.name == "emulator":
        target.ops.take_launches()
    x64, y64 = torch.randn(3, 1032, dtype=torch.float64), torch.randn(5, 1032, dtype=torch.float64)
    h = as_h(900.0)
    k = target.ops.rbf_kernel(x64.to(dtype).to(target.device), y64.to(dtype).to(target.device), h.to(target.device))
    expected = reference.rbf_kernel(x64.to(dtype).double(), y64.to(dtype).double(), h)
    assert relative_error(k.cpu().double(), expected) < (1e-5 if dtype == torch.float32 else 2 * HALF_ULP[dtype])
    if target.name == "emulator":
        assert streamed_launches(target) == 1


def test_streamed_kernels_keep_to_what_they_can_copy(target, monkeypatch):
    """Rows that are not 16-byte aligned (an odd feature count in fp32, or a tensor starting 4 bytes into its
    storage) and float64 take the register kernels, with the same results; a bad BMT_FAST_CUDA_GRAM is
    refused."""
    monkeypatch.setenv("BMT_FAST_CUDA_GRAM", "streamed")
    if target.name == "emulator":
        target.ops.take_launches()
    storage = torch.randn(16 * 1000 + 1, dtype=torch.float32)
    shifted = storage[1:].view(16, 1000)
    for x in (shifted, torch.randn(16, 999), torch.randn(16, 1000, dtype=torch.float64)):
        x = x.to(target.device)
        s = torch.randn_like(x)
        phi = target.ops.svgd_step(x, s, None, "gram")
        expected = svgd_reference(x.cpu().double(), s.cpu().double())
        assert relative_error(phi.cpu().double(), expected) < (1e-12 if x.dtype == torch.float64 else 1e-4)
    if target.name == "emulator":
        assert streamed_launches(target) == 0
    monkeypatch.setenv("BMT_FAST_CUDA_GRAM", "stream")
    with pytest.raises(RuntimeError, match='BMT_FAST_CUDA_GRAM must be "registers" or "streamed", got "stream"'):
        target.ops.svgd_step(torch.randn(4, 8, device=target.device), torch.randn(4, 8, device=target.device),
                             None, "gram")


# ---- the emulator's race and pipeline checks -------------------------------------------------------

SCHEDULE_CASES = [("svgd", "tiled", 130, 37, torch.bfloat16), ("svgd", "tiled", 70, 130, torch.float16),
                  ("svgd", "tiled", 65, 17, torch.float32), ("svgd", "tiled", 70, 130, torch.float64),
                  ("svgd", "gram", 17, 33, torch.float32), ("svgd", "gram", 8, 40, torch.bfloat16),
                  ("streamed", "gram", 16, 2000, torch.float32), ("streamed", "gram", 16, 4000, torch.bfloat16),
                  ("median", "tiled", 130, 40, torch.bfloat16), ("median", "tiled", 130, 9, torch.float32)]


@pytest.mark.parametrize("order,copies", [("reverse", "immediate"), ("shuffle", "deferred"), ("forward", "immediate")])
@pytest.mark.parametrize("what,algorithm,n,d,dtype", SCHEDULE_CASES)
def test_emulated_schedules_and_copy_timings_agree(target, monkeypatch, order, copies, what, algorithm, n, d, dtype):
    """Threads run between barriers in another order, cp.async copies land at issue instead of at the
    wait: a read of shared memory written in the same phase, or of a buffer before its wait, changes
    the result."""
    if target.name != "emulator":
        pytest.skip("emulator only")
    monkeypatch.setenv("BMT_FAST_EMULATE_ORDER", order)
    monkeypatch.setenv("BMT_FAST_EMULATE_CP_ASYNC", copies)
    if what == "streamed":  # one SM: several chunks around the ring of stages
        monkeypatch.setenv("BMT_FAST_CUDA_GRAM", "streamed")
        monkeypatch.setenv("BMT_FAST_EMULATE_SMS", "1")
    if what == "median":
        x = (torch.randn(n, d, dtype=torch.float64) * 2 + 10).to(dtype)
        assert math.isclose(float(target.ops.median_bandwidth(x, algorithm)), numpy_rule(x),
                            rel_tol=median_tolerance(algorithm, dtype, d))
    else:
        check_svgd(target, algorithm, n, d, dtype, "median")


# ---- through the public API on a GPU ---------------------------------------------------------------


def test_public_api_strides_and_event_shapes(gpu):
    strided = torch.randn(40, 30, dtype=torch.float64, device="cuda").t()[::2]  # (15, 40), not contiguous
    event = torch.randn(300, 10, 4, dtype=torch.float64, device="cuda")
    for x in (strided, event):
        score = torch.randn(x.shape, dtype=torch.float64, device="cuda")
        phi = bmt_fast.svgd_step(x, score, backend="cuda")
        assert phi.shape == x.shape and phi.device == x.device and not phi.requires_grad
        expected = reference.svgd_step(x.reshape(len(x), -1), score.reshape(len(x), -1), None).reshape(x.shape)
        assert relative_error(phi.cpu(), expected.cpu()) < 1e-12


@pytest.mark.parametrize("n", [9, 300])  # Gram and tiled paths
def test_out_and_svgd_step_into_on_cuda(gpu, n):
    """out= on the CUDA backend, and torch.ops.bmt_fast.svgd_step_into on CUDA tensors (n = 9: the register
    kernels write out and the flag; n = 300: svgd_step, a copy into out, a scan for the flag)."""
    x = torch.randn(n, 40, dtype=torch.float64, device="cuda")
    score = torch.randn_like(x)
    out = torch.empty_like(x)
    assert bmt_fast.svgd_step(x, score, backend="cuda", out=out) is out
    torch.testing.assert_close(out, bmt_fast.svgd_step(x, score, backend="cuda"), rtol=0, atol=0)
    out2 = torch.empty_like(x)
    assert bool(torch.ops.bmt_fast.svgd_step_into(x, score, None, "auto", out=out2))
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    score[n - 1, 39] = math.nan
    assert not bool(torch.ops.bmt_fast.svgd_step_into(x, score, None, "auto", out=out2))
    torch.library.opcheck(torch.ops.bmt_fast.svgd_step_into.default, (x, torch.randn_like(x), None, "auto"), {"out": out})


def test_svgd_step_batched_into_on_cuda(gpu):
    """torch.ops.bmt_fast.svgd_step_batched_into on CUDA tensors (the register kernels for all sets at once;
    test_svgd_step_batched_into_is_each_sets_step covers more): each set's phi and flag as svgd_step_into gives
    them, bit for bit where one CTA sums a set's Gram (40 features), the flags on x's device."""
    x = torch.randn(3, 9, 40, dtype=torch.float64, device="cuda")
    score = torch.randn_like(x)
    score[1, 4, 7] = math.nan
    h = torch.tensor([1.0, 40.0, 80.0], dtype=torch.float64, device="cuda")
    for bandwidth in (None, h):
        out = torch.empty_like(x)
        flags = torch.ops.bmt_fast.svgd_step_batched_into(x, score, bandwidth, "auto", out=out)
        assert flags.device == x.device and flags.tolist() == [True, False, True]
        for i in range(3):
            single = torch.empty_like(x[i])
            torch.ops.bmt_fast.svgd_step_into(x[i], score[i], None if bandwidth is None else h[i], "auto", out=single)
            torch.testing.assert_close(out[i], single, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("n", [9, 300])  # the register kernels' flags; the scan of every set's inputs first
def test_vmap_svgd_step_on_cuda_is_each_sets_step(gpu, n):
    """torch.func.vmap of svgd_step on the CUDA backend (the batched op): each set's phi as a single call on
    it, bit for bit; a NaN in one set's score named as that call names it."""
    x = torch.randn(4, n, 40, dtype=torch.float64, device="cuda")
    score = torch.randn_like(x)
    for bandwidth in ("median", 30.0):
        phi = torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s, bandwidth, backend="cuda"))(x, score)
        for i in range(4):
            torch.testing.assert_close(phi[i], bmt_fast.svgd_step(x[i], score[i], bandwidth, backend="cuda"), rtol=0, atol=0)
    score[2, n - 1, 0] = math.nan
    with pytest.raises(ValueError, match="score contains 1 NaN/Inf"):
        torch.func.vmap(lambda a, s: bmt_fast.svgd_step(a, s, backend="cuda"))(x, score)


def test_public_rbf_kernel_autograd(gpu):
    x = torch.randn(6, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    y = torch.randn(5, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    h = torch.tensor(2.5, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: bmt_fast.rbf_kernel(a, b, c, backend="cuda"), (x, y, h))
    assert torch.autograd.gradcheck(lambda a: bmt_fast.rbf_kernel(a, None, 3.0, backend="cuda"), (x,))


def test_public_rbf_kernel_self_gradient(gpu):
    x = torch.randn(300, 10, dtype=torch.float64, device="cuda", requires_grad=True)
    weights = torch.randn(300, 300, dtype=torch.float64, device="cuda")
    grad = torch.autograd.grad((bmt_fast.rbf_kernel(x, None, 7.0, backend="cuda") * weights).sum(), x)[0]
    expected = torch.autograd.grad((reference.rbf_kernel(x, None, as_h(7.0).cuda()) * weights).sum(), x)[0]
    assert relative_error(grad, expected) < 1e-10


@pytest.mark.parametrize("algorithm", ["auto", "tiled", "gram"])
def test_opcheck_on_cuda(gpu, algorithm):
    x = torch.randn(9, 40, dtype=torch.float64, device="cuda")
    y = torch.randn(4, 40, dtype=torch.float64, device="cuda")
    h = torch.tensor(2.0, dtype=torch.float64, device="cuda")
    for bandwidth in (None, h):
        torch.library.opcheck(torch.ops.bmt_fast.svgd_step.default, (x, torch.randn_like(x), bandwidth, algorithm))
    torch.library.opcheck(torch.ops.bmt_fast.median_bandwidth.default, (x, algorithm))
    torch.library.opcheck(torch.ops.bmt_fast.rbf_kernel.default, (x.clone().requires_grad_(), y, h))
    k = torch.ops.bmt_fast.rbf_kernel(x, y, h)
    grad = torch.randn(9, 4, dtype=torch.float64, device="cuda")
    for mask in ([True, True, True], [True, False, False]):
        torch.library.opcheck(torch.ops.bmt_fast.rbf_kernel_backward.default, (grad, x, y, k, h, mask))
    k_self = torch.ops.bmt_fast.rbf_kernel(x, x, h)  # (the CompositeExplicitAutograd rule on CUDA)
    for mask in ([True, True], [True, False]):
        torch.library.opcheck(torch.ops.bmt_fast.rbf_kernel_self_backward.default,
                              (torch.randn(9, 9, dtype=torch.float64, device="cuda"), x, k_self, h, mask))


def test_torch_compile_on_cuda(gpu):
    def step(x, s, h):
        return bmt_fast.svgd_step(x, s, h, backend="cuda", check_inputs=False)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = torch.randn(40, 8, device="cuda")
    s = torch.randn(40, 8, device="cuda")
    h = torch.tensor(3.0, device="cuda")
    torch.testing.assert_close(compiled(x, s, h), step(x, s, h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_particles_use_bounded_memory(gpu, dtype):
    """n = 65536 without any n x n buffer (one fp32 n x n matrix would be 17 GB)."""
    x = torch.randn(65536, 64, device="cuda").to(dtype)
    s = torch.randn(65536, 64, device="cuda").to(dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    phi = bmt_fast.svgd_step(x, s, 64.0, backend="cuda", check_inputs=False)
    torch.cuda.synchronize()
    extra_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    assert torch.isfinite(phi).all()
    assert extra_mib < 256, f"peak extra memory {extra_mib:.0f} MiB"


def test_svgd_moves_particles_to_a_gaussian_on_gpu(gpu):
    mu, sigma = torch.tensor([2.0, -1.0], device="cuda"), 0.5
    x = torch.randn(200, 2, device="cuda") * 0.1 + 5.0
    for _ in range(800):
        x = x + 0.05 * bmt_fast.svgd_step(x, -(x - mu) / sigma**2, backend="cuda", check_inputs=False)
    torch.testing.assert_close(x.mean(0), mu, atol=0.1, rtol=0)
    assert ((x.std(0) - sigma).abs() < 0.3 * sigma).all(), x.std(0)


def test_second_device_uses_its_own_stream_and_guard(gpu):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x, s, x64, s64 = particles(70, 40, torch.float32)
    phi = torch.ops.bmt_fast.svgd_step(x.to("cuda:1"), s.to("cuda:1"), None, "tiled")
    assert phi.device == torch.device("cuda:1")
    assert relative_error(phi.cpu(), svgd_reference(x64, s64)) < 1e-5
