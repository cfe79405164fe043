"""The "triton" backend: the Triton kernels of bmt_fast.kernels behind the public ops.

Runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before the kernels were imported
(Triton's interpreter: slow, for tests). The kernels are imported on first use, so `import bmt_fast` does
not pay for importing Triton; a missing or broken Triton leaves the backend unavailable with the reason.

Precision: `allow_tf32` of this backend (None by default: fp32 follows torch.get_float32_matmul_precision())
is passed to every kernel; see bmt_fast.kernels.utils.dot_mode. Set it with
`bmt_fast.backends.get("triton").allow_tf32 = True` (or False: IEEE fp32 whatever torch's setting).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from . import backends


def _import_kernels() -> ModuleType:
    """bmt_fast.kernels: installed as a subpackage, or kernels/ beside bmt_fast/ in a source checkout."""
    try:
        return importlib.import_module("bmt_fast.kernels")
    except ModuleNotFoundError as exc:
        if exc.name != "bmt_fast.kernels":
            raise
    source = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not source.is_file():
        raise ModuleNotFoundError("bmt_fast.kernels is not installed", name="bmt_fast.kernels")
    spec = importlib.util.spec_from_file_location("bmt_fast.kernels", source, submodule_search_locations=[str(source.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["bmt_fast.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["bmt_fast.kernels"]
        raise
    return module


def _load_kernels(backend: "TritonBackend") -> str:
    """Imports the Triton kernels into backend; why they cannot run ("" if they can). Run as it is, not traced,
    where torch.compile meets it (its result a constant of the graph: backends do not come or go), so a
    compiled call may be the process's first use of the backend (dynamo does not trace importlib)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        backend._set_kernels(_import_kernels())
    except Exception as exc:  # a Triton too old or broken must not break `import bmt_fast`
        return f"the Triton kernels failed to import: {type(exc).__name__}: {exc}"
    return ""


# torch.compiler.assume_constant_result's mark, set without it: the decorator imports torch._dynamo, which
# `import bmt_fast` must not (1.2 s on the 2-core EPYC VM, measured 2026-12-06, and it broke the import where a
# package it probes is hidden).
# tests/test_triton_svgd_step.py compiles a first use in a fresh process, so a torch that reads another mark
# is noticed.
_load_kernels._dynamo_marked_constant = True  # type: ignore[attr-defined]


class TritonBackend(backends.Backend):
    name = "triton"

    def __init__(self) -> None:
        self.allow_tf32: bool | None = None
        self._kernels: ModuleType | None = None
        self._reason: str | None = None

    def _load(self) -> None:
        if self._reason is None:
            self._reason = _load_kernels(self)

    def _set_kernels(self, kernels: ModuleType) -> None:
        self._kernels = kernels

    def unavailable_reason(self) -> str:
        self._load()
        if self._reason:
            return self._reason
        if not torch.cuda.is_available() and not self._kernels.INTERPRETING:
            return "no CUDA device (TRITON_INTERPRET=1 before importing bmt_fast runs the kernels on the CPU)"
        return ""

    @property
    def device_types(self) -> tuple[str, ...]:
        if self.available() and self._kernels.INTERPRETING:
            return ("cuda", "cpu")
        return ("cuda",)

    def kernels(self) -> ModuleType:
        """The bmt_fast.kernels module; RuntimeError with the reason if Triton cannot run here."""
        reason = self.unavailable_reason()
        if reason:
            raise RuntimeError(f"the Triton backend is not available: {reason}")
        return self._kernels

    def svgd_step(self, x, score, h):
        return torch.ops.bmt_fast_triton.svgd_step(x, score, h, "auto", self.allow_tf32)

    def svgd_step_into(self, x, score, h, out):
        return torch.ops.bmt_fast_triton.svgd_step_into(x, score, out, h, "auto", self.allow_tf32)

    def svgd_step_spreads_non_finite(self, x):
        # The Gram path (the one "auto" takes for n <= GRAM_MAX_PARTICLES), whose one kernel pass notes
        # whether phi is finite as it stores it: a bad x value makes its column's centring shift, and so that column of
        # every centred row, non-finite (and its row's distances, hence K), and a bad score reaches every
        # phi row through the K @ W dot, zero weights included (0 * NaN and 0 * Inf are NaN).
        return self.available() and x.device.type in self.device_types and self._kernels.median.use_gram(x.shape[0], "auto")

    def rbf_kernel(self, x, y, h):
        return torch.ops.bmt_fast_triton.rbf_kernel(x, x if y is None else y, h, y is None, self.allow_tf32)

    def median_bandwidth(self, x):
        return torch.ops.bmt_fast_triton.median_bandwidth(x, "auto", self.allow_tf32)

    def rbf_kernel_vjp(self, grad, x, y, h, k, needs):
        ops = torch.ops.bmt_fast_triton
        return backends.vjp_by_ops(
            ops.rbf_kernel_self_backward, ops.rbf_kernel_backward, grad, x, y, h, k, needs, self.allow_tf32
        )


# Many-particle sizes at which the Triton kernels beat the CUDA kernels on an H200 (benchmarks/results/
# nvidia-h200.csv): fp32, n = 65536, d = 64: triton 68.8 ms, cuda 91.7 ms; bf16, n = 65536, d = 128 (the flash
# kernel, d <= its width): triton 14.8 ms with three products, 5.55 ms with one (the bf16 default since),
# cuda 16.6 ms.
TRITON_FIRST_MIN_PARTICLES = 32768
# The Triton kernels refuse tensors of more elements (their offsets are 32-bit; kernels/utils.py reads it
# from here): "auto" skips them there.
TRITON_MAX_ELEMENTS = 2**31 - 1
# up to how many features, by input dtype (bf16: the flash kernel's width, kernels/svgd_step.py: FLASH_MAX_D)
TRITON_FIRST_MAX_FEATURES = {torch.float32: 64, torch.float64: 64, torch.bfloat16: 128}


def cuda_auto_rule(op: str, n: int, d: int, dtype: torch.dtype) -> list[str]:
    """backend="auto" on CUDA tensors, from the svgd_step timings on an H200 (benchmarks/results/
    nvidia-h200.csv, one run each):

    * the compiled CUDA kernels first: faster than Triton in the prompt regime (fp32 n=16 d=76,800:
      0.057 (0.095 on 2026-11-30) vs 1.22 ms; n=64 d=409,600: 0.80 (0.72) vs 0.86 ms) and at n=1024 d=16
      fp32 (0.22 vs 1.18 ms);
    * Triton first for many particles: fp32/fp64 in few dimensions (n >= 32768, d <= 64), where its tiles
      won (65536 x 64 fp32: 68.8 vs 91.7 ms), and bf16 up to 128 dimensions, where its flash kernel won
      (65536 x 128: 5.55 ms with one bf16 product, the same precision as the CUDA kernel's 16.6 ms);
    * torch (the reference, which materialises n x n) last.

    rbf_kernel and median_bandwidth follow the same order (not measured apart on a GPU). Sizes between
    the measured ones are a guess from their neighbours; a GPU run of `bash scripts/gpu_check.sh` adds rows.
    """
    if n * d > TRITON_MAX_ELEMENTS or (op == "rbf_kernel" and n * n > TRITON_MAX_ELEMENTS):
        return ["cuda", "torch"]  # past the Triton kernels' 32-bit offsets
    if n >= TRITON_FIRST_MIN_PARTICLES and d <= TRITON_FIRST_MAX_FEATURES.get(dtype, 0):
        return ["triton", "cuda", "torch"]
    return ["cuda", "triton", "torch"]


TRITON = TritonBackend()
backends.register(TRITON)
load_kernels = TRITON.kernels
backends.set_auto_rule("cuda", cuda_auto_rule)
