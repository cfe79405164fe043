"""Providers: the ways a user could compute each op, each in a few readable lines.

A provider turns prepared inputs into a zero-argument `run()` that computes the op once and returns the
result as a tensor. All providers of an op compute the same quantity; the harness checks them against the
float64 reference (`bmt_fast.reference`) at a small size and against each other at every benchmarked size
before it times anything.

svgd_step and rbf_kernel use a fixed bandwidth H (a 0-dim tensor; see `benchmarks.harness.Inputs`): the
median rule is benchmarked on its own by `benchmarks.median_bandwidth`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

import torch

import bmt_fast
from bmt_fast import reference

Run = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Provider:
    """One way to compute an op.

    build(inputs) -> run: prepares anything that does not depend on the data (compiled graphs, numpy views)
        and returns a callable that computes the op once. build itself is neither timed nor counted in the
        peak memory: the op's work must happen in run.
    why_unavailable(device) -> "" if the provider can run on this device here, else the reason.
    extra_memory(n, d, elem_bytes) -> a rough upper bound of the bytes it needs beyond its inputs, so that
        the harness can record "skipped: would need X GB" instead of running the machine out of memory.
    rtol: allowed max|a - b| / max|b| against the float64 reference at a small size for fp32 inputs; other
        dtypes scale it by their precision (harness.tolerance).
    method_rtol: the method's own difference from the reference in any dtype (sampled pairs, another median
        rule): the tolerance is never below it.
    jit: its first call compiles (torch.compile, KeOps): the harness reports that call apart.
    dtypes: the input dtypes it is meant for (None: all); for others its rows say so instead of running.
    """

    name: str
    build: Callable[["object"], Run]
    why_unavailable: Callable[[torch.device], str] = lambda device: ""
    extra_memory: Callable[[int, int, int], float] = lambda n, d, e: 0.0
    rtol: float = 1e-4
    method_rtol: float = 0.0
    jit: bool = False
    version: Callable[[], str] = lambda: ""
    dtypes: tuple[torch.dtype, ...] | None = None

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str:
        """"" if it runs for inputs of this dtype on this device here, else the reason."""
        if self.dtypes is not None and dtype not in self.dtypes:
            return "for " + ", ".join(str(t).replace("torch.", "") for t in self.dtypes) + " inputs only"
        return self.why_unavailable(device)


def package_version(name: str) -> str:
    try:
        return f"{name} {importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return ""


def needs_package(module: str, pip_name: str) -> Callable[[torch.device], str]:
    def why(device: torch.device) -> str:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure makes the provider unavailable
            return f"{pip_name} cannot be imported: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return ""

    return why


def cpu_only(device: torch.device) -> str:
    return "" if device.type == "cpu" else "runs on the CPU only (numpy)"


def both(*checks: Callable[[torch.device], str]) -> Callable[[torch.device], str]:
    return lambda device: next((reason for reason in (c(device) for c in checks) if reason), "")


@functools.cache
def compiled(fn: Callable, dynamic: bool | None = None) -> Callable:
    """torch.compile(fn), by default as a user would call it: the first size compiles with static shapes,
    the second recompiles with dynamic shapes, which later sizes reuse. dynamic=False compiles every size
    anew (a sweep has a few dozen; the limits are raised to match). Should dynamo still reach a recompile
    limit it raises (a recorded error) instead of silently running fn eagerly."""
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)
    return torch.compile(fn, dynamic=dynamic)


def row_block(n: int, elem_bytes: int, budget_bytes: int = 64 << 20) -> int:
    """Rows per block so that a (block x n) tile stays within budget_bytes."""
    return max(64, min(n, budget_bytes // max(1, n * elem_bytes)))


# ---- svgd_step -------------------------------------------------------------------------------------


# Triton compiles for a GPU; in the interpreter (no GPU) it runs at once.
GPU = torch.cuda.is_available()

# cdist by matmul at every size: its direct kernels (taken for <= 25 rows) have no bfloat16 version.
CDIST_MODE = "use_mm_for_euclid_dist"


def svgd_naive(x: torch.Tensor, score: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """What most SVGD code does: the full n x n kernel matrix from cdist, then two n x n matmuls."""
    k = torch.exp(-torch.cdist(x, x, compute_mode=CDIST_MODE).square() / h)
    return (k @ score + (2 / h) * (x * k.sum(1, keepdim=True) - k @ x)) / x.shape[0]


def svgd_blocked(x: torch.Tensor, score: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The naive math a block of rows at a time: memory block x n instead of n x n."""
    n, d = x.shape
    v = torch.cat([score, x], 1)
    phi = torch.empty_like(x)
    block = row_block(n, x.element_size())
    for i in range(0, n, block):
        xb = x[i : i + block]
        k = torch.cdist(xb, x, compute_mode=CDIST_MODE).square_().div_(-h).exp_()
        kv = k @ v
        phi[i : i + block] = (kv[:, :d] + (2 / h) * (xb * k.sum(1, keepdim=True) - kv[:, d:])) / n
    return phi


def attention_with_lse(q, k, v, bias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * q k^T + bias) v and its log-sum-exp, through torch's fused SDPA kernels.

    The public F.scaled_dot_product_attention does not return the log-sum-exp, so this calls the aten
    kernels behind it: the CPU flash kernel, and the CUDA memory-efficient kernel (the flash kernel
    takes no additive bias). Both return the log-sum-exp of each query row.
    """
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, compute_log_sumexp=True, dropout_p=0.0, is_causal=False, scale=scale
    )
    return out, lse[..., : q.shape[2]]  # the CUDA kernel pads the row count of lse


def svgd_attention_sdpa(x: torch.Tensor, score: torch.Tensor, h: float) -> torch.Tensor:
    """k_ij = exp(-|x_i|²/H) · exp(2 x_i·x_j/H - |x_j|²/H): one attention call with scale 2/H, key bias
    -|x_j|²/H and V = score - (2/H) x (score and x folded into one head, as SDPA wants V as wide as Q);
    the row sums of K come from the log-sum-exp: sum_j k_ij = exp(lse_i - |x_i|²/H)."""
    n, d = x.shape
    xc = x - x.mean(0)  # translation invariance: centring keeps the exponents small
    sq = (xc * xc).sum(1)
    w = score - (2 / h) * xc
    bias = (-sq / h).view(1, 1, 1, n).expand(1, 1, n, n)  # a stride-0 view, never n x n in memory
    q = xc.view(1, 1, n, d)
    out, lse = attention_with_lse(q, q, w.view(1, 1, n, d), bias, scale=2 / h)
    rowsum = torch.exp(lse.view(n) - sq / h)
    return rowsum[:, None] * (out.view(n, d) + (2 / h) * xc) / n


def svgd_attention_flex(flex: Callable) -> Callable:
    """The same reformulation through FlexAttention, with a "sink" key instead of the log-sum-exp
    (FlexAttention under torch.compile on CPU cannot return it): key n has logit |x_i|²/H, the largest
    logit of row i, and V = [w | 0] for real keys, [0 | 1] for the sink. Then the last output column is
    p_i = 1 / (1 + sum_j k_ij), so sum_j k_ij = (1 - p_i) / p_i and (K w)_i = out_i[:d] / p_i."""

    def run(x: torch.Tensor, score: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        n, d = x.shape
        xc = x - x.mean(0)
        sq = (xc * xc).sum(1)
        key_bias = torch.cat([-sq / h, sq.new_zeros(1)])
        sink_logit = sq / h

        def score_mod(s, b, head, q_idx, kv_idx):
            return torch.where(kv_idx == n, sink_logit[q_idx], s + key_bias[kv_idx])

        q = (2 / h) * xc  # the scale goes into q: a float `scale` would recompile for every H
        keys = torch.cat([xc, xc.new_zeros(1, d)])
        v = torch.zeros(n + 1, d + 1, dtype=x.dtype, device=x.device)
        v[:n, :d] = score - (2 / h) * xc
        v[n, d] = 1
        out = flex(q.view(1, 1, n, d), keys.view(1, 1, n + 1, d), v.view(1, 1, n + 1, d + 1),
                   score_mod=score_mod, scale=1.0).view(n, d + 1)
        p = out[:, d:]
        return (out[:, :d] + (2 / h) * (1 - p) * xc) / (p * n)

    return run


def svgd_keops(x: torch.Tensor, score: torch.Tensor, h: float) -> torch.Tensor:
    """pykeops LazyTensors: the kernel matrix is a formula, reduced on the fly (never n x n)."""
    from pykeops.torch import LazyTensor

    n, d = x.shape
    xc = x - x.mean(0)
    w = torch.cat([score - (2 / h) * xc, torch.ones_like(xc[:, :1])], 1)  # [score term | row sums]
    xi, xj, wj = LazyTensor(xc[:, None, :]), LazyTensor(xc[None, :, :]), LazyTensor(w[None, :, :])
    acc = ((-((xi - xj) ** 2).sum(-1) / h).exp() * wj).sum(dim=1)
    return (acc[:, :d] + (2 / h) * acc[:, d:] * xc) / n


def svgd_pyro(x: torch.Tensor, score: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Pyro's SVGD math (pyro.infer.svgd): RBFSteinKernel.log_kernel_and_grad gives (n, n, d) tensors,
    combined as in SVGD.step's "multivariate" mode. Pyro's own bandwidth is a per-dimension median; here
    it is our H for every dimension, so the kernel is the same. Pyro negates phi (it feeds an optimizer
    the loss gradient -score); this returns phi."""
    from pyro.infer.svgd import RBFSteinKernel

    class FixedBandwidth(RBFSteinKernel):
        def _bandwidth(self, norm_sq):
            return h.expand(norm_sq.shape[-1])

    log_kernel, kernel_grad = FixedBandwidth().log_kernel_and_grad(x)
    kernel = log_kernel.sum(-1).exp()
    attractive = torch.mm(kernel, score)
    repulsive = torch.einsum("nm,nm...->n...", kernel, kernel_grad)
    return (attractive - repulsive) / x.shape[0]


def _flex_attention() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # FlexAttention runs only compiled on CPU. Static shapes: with dynamic shapes, inductor 2.14's CPU
    # template emits C++ that does not compile ("'cur_kvSplitSize2' was not declared in this scope").
    return compiled(flex_attention, dynamic=False)


def _bmt_fast_svgd(backend: str) -> Callable:
    return lambda inp: lambda: bmt_fast.svgd_step(inp.x, inp.score, inp.h, backend=backend, check_inputs=False)


def _bmt_fast_svgd_checked(backend: str) -> Callable:
    """The default call, check_inputs=True: what the NaN/Inf check adds (the other bmt_fast rows skip it).
    Where the kernel flags a non-finite phi itself (every CPU path, CUDA n <= 16, Triton n <= 256) that is one flag read
    (on a GPU, the call's one host synchronisation); elsewhere a scan of x and one of score."""
    return lambda inp: lambda: bmt_fast.svgd_step(inp.x, inp.score, inp.h, backend=backend)


def _cuda_streamed_svgd(inp) -> Run:
    """The CUDA step under BMT_FAST_CUDA_GRAM=streamed: for n <= 16 the prompt-regime kernels that copy their
    columns through shared memory by cp.async (csrc/cuda/gram.cuh, 1c and 4b), timed beside the default
    register kernels (bmt_fast-cuda) in the same run. The variable is set for the call only (the extension
    reads it at each call; two putenv calls, a few microseconds of host time a GPU launch overlaps)."""

    def run():
        previous = os.environ.get("BMT_FAST_CUDA_GRAM")
        os.environ["BMT_FAST_CUDA_GRAM"] = "streamed"
        try:
            return bmt_fast.svgd_step(inp.x, inp.score, inp.h, backend="cuda", check_inputs=False)
        finally:
            if previous is None:
                del os.environ["BMT_FAST_CUDA_GRAM"]
            else:
                os.environ["BMT_FAST_CUDA_GRAM"] = previous

    return run


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """torch.set_float32_matmul_precision(precision) inside the block, the previous setting after it
    ("medium": fp32 matmuls may multiply bf16-rounded operands: oneDNN's on a CPU with AMX or AVX512-BF16,
    which the CPU backend's AMX path follows; TF32 on a GPU)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def under_bf16_matmuls(run: Run) -> Run:
    """run() under float32_matmul_precision("medium")."""

    def wrapped():
        with float32_matmul_precision("medium"):
            return run()

    return wrapped


def _bmt_fast_version() -> str:
    return f"bmt_fast {bmt_fast.__version__}"


def _triton_fast_svgd(inp) -> Run:
    """The Triton step with allow_tf32=True: one TF32 (fp32 inputs) or bf16 (half inputs) product per
    distance instead of the default IEEE fp32 / fp16's three-bf16-product split; bf16 inputs take one bf16
    product by default too, so for them it times the default (kernels/utils.py: dot_mode)."""
    from bmt_fast import backends

    backends.get("triton").kernels()  # imports the kernels, which registers torch.ops.bmt_fast_triton
    return lambda: torch.ops.bmt_fast_triton.svgd_step(inp.x, inp.score, inp.h, "auto", True)


def _triton_tiled_svgd(inp) -> Run:
    """The default Triton step with the flash path switched off (kernels/svgd_step.py: FLASH_ENABLED): the
    tiled kernel it replaced for d <= 128 in the tensor-core modes, timed beside it in the same run."""
    import importlib

    from bmt_fast import backends

    backends.get("triton").kernels()
    module = importlib.import_module("bmt_fast.kernels.svgd_step")

    def run():
        module.FLASH_ENABLED = False
        try:
            return bmt_fast.svgd_step(inp.x, inp.score, inp.h, backend="triton", check_inputs=False)
        finally:
            module.FLASH_ENABLED = True

    return run


def _bmt_fast_rbf(backend: str) -> Callable:
    return lambda inp: lambda: bmt_fast.rbf_kernel(inp.x, None, inp.h, backend=backend, check_inputs=False)


def _bmt_fast_median(backend: str) -> Callable:
    return lambda inp: lambda: bmt_fast.median_bandwidth(inp.x, backend=backend, check_inputs=False)


def bmt_fast_providers(op: str, build: Callable[[str], Callable] | None = None) -> list[Provider]:
    """One provider per bmt_fast backend (including backends that cannot run here, so their rows say why);
    build(backend) -> Provider.build, by default the op's own call."""
    from bmt_fast import backends

    if build is None:
        build = {"svgd_step": _bmt_fast_svgd, "rbf_kernel": _bmt_fast_rbf, "median_bandwidth": _bmt_fast_median}[op]
    providers = []
    for name, backend in backends._REGISTRY.items():
        materialises = name == "torch"  # the reference backend builds the n x n matrix
        providers.append(
            Provider(
                name=f"bmt_fast-{name}",
                build=build(name),
                why_unavailable=_backend_reason(backend),
                extra_memory=(lambda n, d, e: 5.0 * n * n * max(e, 4)) if materialises else (lambda n, d, e: 0.0),
                jit=name == "triton" and GPU,  # on a GPU its first call per shape compiles and autotunes (~25 s, H200)
                version=_bmt_fast_version,
            )
        )
    return providers


def autograd_providers(op: str, gradient: Callable, naive_kernel: Callable,
                       extra_memory: Callable[[int, int, int], float], compile_rtol: float = 1e-4) -> list[Provider]:
    """The providers of an op that is a gradient by autograd through the RBF kernel: gradient(kernel, inputs)
    returns it with kernel(a, b, H) the kernel (b None: a with itself). Naive torch (naive_kernel, which
    keeps extra_memory), torch.compile of it, and every bmt_fast backend's rbf_kernel."""

    def bmt_fast_gradient(backend: str) -> Callable:
        kernel = lambda a, b, h: bmt_fast.rbf_kernel(a, b, h, backend=backend, check_inputs=False)  # noqa: E731
        return lambda inp: lambda: gradient(kernel, inp)

    return [
        Provider("torch-naive", lambda inp: lambda: gradient(naive_kernel, inp), extra_memory=extra_memory),
        Provider("torch-compile",
                 lambda inp: (lambda f: lambda: gradient(f, inp))(compiled(naive_kernel)),
                 extra_memory=extra_memory, jit=True, rtol=compile_rtol),
        *bmt_fast_providers(op, bmt_fast_gradient),
    ]  # fmt: skip


def _backend_reason(backend) -> Callable[[torch.device], str]:
    def why(device: torch.device) -> str:
        reason = backend.unavailable_reason()
        if reason:
            return reason
        return "" if backend.supports(device) else f"does not run on {device.type} tensors"

    return why


def svgd_step_providers() -> list[Provider]:
    pykeops = needs_package("pykeops.torch", "pykeops")
    return [
        Provider("torch-naive", lambda inp: lambda: svgd_naive(inp.x, inp.score, inp.h),
                 extra_memory=lambda n, d, e: 3.0 * n * n * e),
        Provider("torch-compile", lambda inp: _bind(compiled(svgd_naive), inp, inp.h),
                 extra_memory=lambda n, d, e: 3.0 * n * n * e, jit=True, rtol=2e-4),
        Provider("torch-blocked", lambda inp: lambda: svgd_blocked(inp.x, inp.score, inp.h),
                 extra_memory=lambda n, d, e: 3.0 * row_block(n, e) * n * e + 3.0 * n * d * e),
        Provider("attention-sdpa", lambda inp: _bind(svgd_attention_sdpa, inp, inp.h_float),
                 extra_memory=lambda n, d, e: 6.0 * n * d * e),
        Provider("attention-flex", lambda inp: _bind(svgd_attention_flex(_flex_attention()), inp, inp.h),
                 # measured: its CPU kernel holds n x n values (1 GB at n = 16384)
                 extra_memory=lambda n, d, e: 1.1 * n * n * e + 8.0 * n * d * e, jit=True),
        Provider("pykeops", lambda inp: _bind(svgd_keops, inp, inp.h_float), why_unavailable=pykeops,
                 extra_memory=lambda n, d, e: 4.0 * n * d * e, jit=True, version=lambda: package_version("pykeops")),
        Provider("pyro", lambda inp: lambda: svgd_pyro(inp.x, inp.score, inp.h),
                 why_unavailable=needs_package("pyro.infer.svgd", "pyro-ppl"),
                 extra_memory=lambda n, d, e: 5.0 * n * n * d * e, version=lambda: package_version("pyro-ppl")),
        *bmt_fast_providers("svgd_step"),
        *[Provider(f"bmt_fast-{name}-checked", _bmt_fast_svgd_checked(name),
                   why_unavailable=_backend_reason(bmt_fast.backends.get(name)), version=_bmt_fast_version)
          for name in ("cpu", "cuda", "triton")],
        # fp32 under torch's "medium" matmul precision: ATen's GEMMs (naive torch's) and the CPU backend's AMX
        # path then multiply bf16-rounded operands (bmt_fast.svgd_step: "Numerics" in the README). Naive
        # torch's distances are of the uncentred particles, which lose more to the rounding (1.7e-2 at
        # n = 200, d = 16 on an AMX Xeon; the AMX path centres them first).
        Provider("torch-naive-bf16mm", lambda inp: under_bf16_matmuls(lambda: svgd_naive(inp.x, inp.score, inp.h)),
                 extra_memory=lambda n, d, e: 3.0 * n * n * e, rtol=4e-2, dtypes=(torch.float32,)),
        Provider("bmt_fast-cpu-bf16mm", lambda inp: under_bf16_matmuls(_bmt_fast_svgd("cpu")(inp)), rtol=1e-2,
                 why_unavailable=_backend_reason(bmt_fast.backends.get("cpu")), version=_bmt_fast_version,
                 dtypes=(torch.float32,)),
        Provider("bmt_fast-triton-tf32", _triton_fast_svgd, why_unavailable=_backend_reason(bmt_fast.backends.get("triton")),
                 rtol=2e-3, jit=GPU, version=_bmt_fast_version),
        Provider("bmt_fast-cuda-streamed", _cuda_streamed_svgd, why_unavailable=_backend_reason(bmt_fast.backends.get("cuda")),
                 version=_bmt_fast_version),
        Provider("bmt_fast-triton-tiled", _triton_tiled_svgd, why_unavailable=_backend_reason(bmt_fast.backends.get("triton")),
                 jit=GPU, version=_bmt_fast_version),
    ]


def _bind(fn: Callable, inp, h) -> Run:
    return lambda: fn(inp.x, inp.score, h)


# ---- rbf_kernel ------------------------------------------------------------------------------------


def rbf_naive(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.exp(-torch.cdist(x, x, compute_mode=CDIST_MODE).square() / h)


def rbf_sklearn(inp) -> Run:
    """scikit-learn's rbf_kernel (numpy; gamma = 1/H), zero-copy views in and out."""
    from sklearn.metrics.pairwise import rbf_kernel

    x_np, gamma = inp.x.numpy(), 1.0 / inp.h_float
    return lambda: torch.from_numpy(rbf_kernel(x_np, gamma=gamma))


def rbf_kernel_providers() -> list[Provider]:
    out = lambda n, d, e: 1.0 * n * n * e  # noqa: E731 - every provider returns the n x n matrix
    return [
        Provider("torch-naive", lambda inp: lambda: rbf_naive(inp.x, inp.h),
                 extra_memory=lambda n, d, e: 3.0 * n * n * e),
        Provider("torch-compile", lambda inp: (lambda f: lambda: f(inp.x, inp.h))(compiled(rbf_naive)),
                 extra_memory=lambda n, d, e: 3.0 * n * n * e, jit=True),
        Provider("sklearn", rbf_sklearn, why_unavailable=both(cpu_only, needs_package("sklearn", "scikit-learn")),
                 extra_memory=lambda n, d, e: 3.0 * n * n * 8, rtol=2e-4, version=lambda: package_version("scikit-learn")),
        *[
            p if p.name == "bmt_fast-torch" else dataclasses.replace(p, extra_memory=out)
            for p in bmt_fast_providers("rbf_kernel")
        ],
    ]


# ---- median_bandwidth ------------------------------------------------------------------------------


def median_naive(x: torch.Tensor) -> torch.Tensor:
    """torch's one-liner. torch.median is the lower median; the numpy rule averages the two middle values.
    They differ by half a gap between order statistics: ~1% for a few particles, < 1e-4 from n ~ 256 on."""
    return torch.cdist(x, x, compute_mode=CDIST_MODE).square().median() / math.log(x.shape[0] + 1)


def median_scipy(inp) -> Run:
    """The SVGD authors' code: squared pdist distances as a full square matrix (diagonal zeros included),
    numpy.median, in float64."""
    import numpy as np
    from scipy.spatial.distance import pdist, squareform

    x_np = inp.x.double().numpy()  # (pdist computes in float64; numpy has no bf16: its rows had been errors)
    n = x_np.shape[0]
    return lambda: torch.tensor(np.median(squareform(pdist(x_np)) ** 2) / np.log(n + 1))


def median_sampled(inp) -> Run:
    generator = torch.Generator(device="cpu").manual_seed(0)
    return lambda: bmt_fast.median_bandwidth(inp.x, method="sampled", generator=generator, check_inputs=False)


def median_bandwidth_providers() -> list[Provider]:
    return [
        Provider("torch-naive", lambda inp: lambda: median_naive(inp.x),
                 extra_memory=lambda n, d, e: 4.0 * n * n * e, method_rtol=1e-2),
        Provider("scipy", median_scipy, why_unavailable=both(cpu_only, needs_package("scipy.spatial", "scipy")),
                 extra_memory=lambda n, d, e: 2.5 * n * n * 8, version=lambda: package_version("scipy")),
        *bmt_fast_providers("median_bandwidth"),
        # 65,536 sampled pairs: within 2% at 3 standard deviations (see bmt_fast.median_bandwidth); both
        # ends of a block of pairs gathered at a time (two buffers of up to SAMPLE_BLOCK_VALUES values),
        # and the pairs' indices and distances. (Where the exact median costs less, as on the CPU up to
        # n = 2048, that is what it returns.)
        Provider("bmt_fast-sampled", median_sampled, method_rtol=0.02, version=_bmt_fast_version,
                 extra_memory=lambda n, d, e: 2.0 * min(reference.SAMPLE_BLOCK_VALUES, 65536 * d) * 4 + 65536 * 20.0),
    ]


# ---- registry --------------------------------------------------------------------------------------

_FACTORIES = {
    "svgd_step": svgd_step_providers,
    "rbf_kernel": rbf_kernel_providers,
    "median_bandwidth": median_bandwidth_providers,
}


def misbehaving_providers(op: str) -> list[Provider]:
    """Providers that hang, die or compute a wrong result, for the harness's own tests
    (BMT_FAST_BENCH_TEST_PROVIDERS=1); the wrong ones for svgd_step only."""

    def hang(inp) -> Run:
        return lambda: time.sleep(3600)

    def killed(inp) -> Run:  # what the kernel's OOM killer does to a process
        return lambda: os.kill(os.getpid(), signal.SIGKILL)

    def raises(inp) -> Run:
        def run():
            raise RuntimeError("provider failed on purpose")

        return run

    def fp32_inside(inp) -> Run:  # right to fp32's precision, whatever the inputs' dtype
        return lambda: svgd_naive(inp.x.float(), inp.score.float(), inp.h.float()).to(inp.x.dtype)

    def off_when_large(inp) -> Run:  # right at the check sizes (n <= 200), 30 % off beyond
        factor = 1.3 if inp.x.shape[0] > 200 else 1.0
        return lambda: svgd_naive(inp.x, inp.score, inp.h) * factor

    def off(inp) -> Run:
        return lambda: svgd_naive(inp.x, inp.score, inp.h) * 1.3

    def nan_when_large(inp) -> Run:  # right at the check sizes, NaN beyond
        factor = math.nan if inp.x.shape[0] > 200 else 1.0
        return lambda: svgd_naive(inp.x, inp.score, inp.h) * factor

    def shape_when_large(inp) -> Run:  # right at the check sizes, a row short beyond
        rows = inp.x.shape[0] - (1 if inp.x.shape[0] > 200 else 0)
        return lambda: svgd_naive(inp.x, inp.score, inp.h)[:rows]

    def raises_after_warm_up(inp) -> Run:  # the third call of a large size on (memory, or a timed round)
        calls = [0]

        def run():
            calls[0] += 1
            if inp.x.shape[0] > 200 and calls[0] >= int(os.environ.get("BMT_FAST_BENCH_TEST_FAILING_CALL", "3")):
                raise torch.OutOfMemoryError("out of memory on purpose")
            return svgd_naive(inp.x, inp.score, inp.h)

        return run

    wrong = [Provider("test-fp32-inside", fp32_inside), Provider("test-off-when-large", off_when_large),
             Provider("test-off", off), Provider("test-nan-when-large", nan_when_large),
             Provider("test-shape-when-large", shape_when_large),
             Provider("test-raises-after-warm-up", raises_after_warm_up)] if op == "svgd_step" else []  # fmt: skip
    return [Provider("test-hang", hang), Provider("test-killed", killed), Provider("test-raises", raises), *wrong]


def register(op: str, factory: Callable[[], list[Provider]]) -> None:
    """Providers of a new op (e.g. the end-to-end prompt-transfer step), listed by `factory`."""
    _FACTORIES[op] = factory


def providers_for(op: str) -> dict[str, Provider]:
    """All providers of `op` by name, in the order they are benchmarked."""
    if op not in _FACTORIES:
        raise ValueError(f"unknown op {op!r}; choose from {', '.join(_FACTORIES)}")
    providers = _FACTORIES[op]()
    if os.environ.get("BMT_FAST_BENCH_TEST_PROVIDERS") == "1":
        providers += misbehaving_providers(op)
    return {p.name: p for p in providers}
