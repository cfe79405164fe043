"""TRITON_INTERPRET is set before any Triton kernel module is imported, so the Triton kernels run on the
CPU when there is no GPU (as in Triton's own CI)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import CPU_BACKENDS  # noqa: E402


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    """Every backend that runs on CPU tensors in this build."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
