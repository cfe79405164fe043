"""Triton kernels of bmt_fast, installed as bmt_fast.kernels (a top-level `kernels` package would clash
with an existing PyPI package).

Each op has a @triton.jit kernel, a launcher (`x_forward`, and `rbf_kernel_backward`) and a torch.library
op in the namespace bmt_fast_triton (distinct from the C++ bmt_fast ops) with a fake kernel for
torch.compile; rbf_kernel is differentiable. They run on CUDA tensors, and on CPU tensors in Triton's
interpreter when TRITON_INTERPRET=1 is set before Triton is first imported.

    torch.ops.bmt_fast_triton.svgd_step(x, score, bandwidth=None, algorithm="auto", allow_tf32=None)
    torch.ops.bmt_fast_triton.median_bandwidth(x, algorithm="auto", allow_tf32=None)
    torch.ops.bmt_fast_triton.rbf_kernel(x, y, bandwidth, self_kernel=False, allow_tf32=None)
    torch.ops.bmt_fast_triton.rbf_kernel_backward(grad, x, y, kernel, bandwidth, output_mask, allow_tf32=None)

allow_tf32 (see utils.dot_mode; errors in benchmarks/results/triton_precision_*.csv):
    None (default)  fp32 inputs: exact fp32 products. bf16/fp16 inputs: each operand split into hi + lo
                    parts in its dtype, three tensor-core products: only the final rounding remains.
    True            fp32: TF32 (relative error ~4e-4 in phi, ~1e-3 in K). bf16/fp16: one product of the
                    operands rounded to their dtype (~1.5 bf16 ulps in phi, ~5 in K).
    False           exact fp32 products for every input dtype.
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
