"""Shared by the Triton tests: the device they run on, skip marks and the kernels module.

On a machine without a GPU, conftest sets TRITON_INTERPRET=1 before bmt_fast is imported, so the kernels
run on CPU tensors in Triton's interpreter (slow per program: small shapes, blocks of 64).
"""

import pytest
import torch

from bmt_fast.triton_backend import TRITON

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")

requires_triton = pytest.mark.skipif(
    not TRITON.supports(DEVICE), reason=f"Triton cannot run on {DEVICE.type}: {TRITON.unavailable_reason()}"
)
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


def kernels():
    """bmt_fast.kernels (imported on first use by the backend)."""
    return TRITON.kernels()


def on_device(*tensors):
    return tuple(t.to(DEVICE) for t in tensors)


def ulp(dtype: torch.dtype) -> float:
    """Relative spacing of the half types at 1 (the error of one rounding is at most half of it)."""
    return {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]


def rounded_product_ulps(dtype: torch.dtype, allow_tf32, ulps: float) -> float:
    """`ulps` (of bf16) where the kernels multiply inputs of `dtype` under `allow_tf32` as one product of
    operands rounded to bf16 (utils.dot_mode: DOT_HALF; bf16 inputs by default, half inputs with True),
    else 0 (the split and exact modes leave only the final rounding)."""
    utils = kernels().utils
    return ulps if utils.dot_mode(dtype, allow_tf32) == utils.DOT_HALF else 0.0
