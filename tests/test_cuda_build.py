"""The CUDA extension where one was built: it loads without a GPU and gives every op a CUDA kernel.

Runs on machines without a GPU (CI builds the extension with nvcc against the CUDA build of torch);
skips with the reason when torch has no CUDA or the build record says the extension was not built.
"""

import pytest
import torch

import bmt_fast
from bmt_fast import _extension, reference

OPS = ("svgd_step", "median_bandwidth", "rbf_kernel", "rbf_kernel_backward")


def _why_not_built() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not _extension.CPU.loaded:
        return f"bmt_fast._C is not loaded: {_extension.CPU.reason}"
    record = _extension.CUDA.build_info
    if not record.get("built", False):
        return f"the CUDA extension was not built: {record.get('reason', 'no build record')}"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_not_built()), reason=_why_not_built() or "built")


def test_extension_loads_without_a_gpu():
    assert _extension.CUDA.loaded, _extension.CUDA.reason


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bmt_fast::{op}", "CUDA")


def test_build_record_and_constants():
    record = _extension.CUDA.build_info
    assert record["cuda_version"] == torch.version.cuda
    assert record["arch_list"]
    info = _extension.CUDA.module.build_info()
    assert info["bandwidth_floor"] == reference.BANDWIDTH_FLOOR
    assert 1 <= info["gram_register_rows"] <= info["gram_max_particles"] <= info["gram_max_rows"]


def test_cuda_kernels_do_not_take_cpu_tensors():
    x = torch.randn(4, 3)
    with pytest.raises((ValueError, RuntimeError), match="cuda"):
        bmt_fast.svgd_step(x, x, backend="cuda")
