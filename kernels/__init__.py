"""Triton kernels of bmt_fast, installed as bmt_fast.kernels (a top-level `kernels` package would clash
with an existing PyPI package).

Each op has a @triton.jit kernel, a launcher (`x_forward`, and `rbf_kernel_backward`) and a torch.library
op in the namespace bmt_fast_triton (distinct from the C++ bmt_fast ops) with a fake kernel for
torch.compile; rbf_kernel is differentiable. They run on CUDA tensors, and on CPU tensors in Triton's
interpreter when TRITON_INTERPRET=1 is set before this package is imported.

    torch.ops.bmt_fast_triton.svgd_step(x, score, bandwidth=None, algorithm="auto", allow_tf32=None)
    torch.ops.bmt_fast_triton.median_bandwidth(x, algorithm="auto", allow_tf32=None)
    torch.ops.bmt_fast_triton.rbf_kernel(x, y, bandwidth, self_kernel=False, allow_tf32=None)
    torch.ops.bmt_fast_triton.rbf_kernel_backward(grad, x, y, kernel, bandwidth, output_mask, allow_tf32=None)

allow_tf32 (see utils.dot_mode): None = exact fp32 products for fp32 inputs and products in the input
dtype for bf16/fp16 inputs; True = TF32 for fp32 inputs; False = exact fp32 products for all inputs.
"""

from .median import GRAM_MAX_PARTICLES, median_bandwidth_forward
from .rbf_kernel import rbf_kernel_backward, rbf_kernel_forward
from .svgd_step import svgd_step_forward
from .utils import INTERPRETING, TileConfig

__all__ = [
    "GRAM_MAX_PARTICLES",
    "INTERPRETING",
    "TileConfig",
    "median_bandwidth_forward",
    "rbf_kernel_backward",
    "rbf_kernel_forward",
    "svgd_step_forward",
]
