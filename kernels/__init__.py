"""Triton kernels of bmt_fast, installed as bmt_fast.kernels (a top-level `kernels` package would clash
with an existing PyPI package).

Each op has a @triton.jit kernel, a launcher (`x_forward`, and `rbf_kernel_backward` / `rbf_kernel_self_backward`) and a torch.library
op in the namespace bmt_fast_triton (distinct from the C++ bmt_fast ops) with a fake kernel for
torch.compile; rbf_kernel is differentiable. They run on CUDA tensors, and on CPU tensors in Triton's
interpreter when TRITON_INTERPRET=1 is set before Triton is first imported.

    torch.ops.bmt_fast_triton.svgd_step(x, score, bandwidth=None, algorithm="auto", allow_tf32=None)
    torch.ops.bmt_fast_triton.median_bandwidth(x, algorithm="auto", allow_tf32=None)
    torch.ops.bmt_fast_triton.rbf_kernel(x, y, bandwidth, self_kernel=False, allow_tf32=None)
    torch.ops.bmt_fast_triton.rbf_kernel_backward(grad, x, y, kernel, bandwidth, output_mask, allow_tf32=None)
    torch.ops.bmt_fast_triton.rbf_kernel_self_backward(grad, x, kernel, bandwidth, output_mask, allow_tf32=None)
        (K = rbf_kernel(x, x, H): x's gradient, both sides summed, from one pass; autograd of a self kernel)

allow_tf32 (see utils.dot_mode). Relative errors max|out - ref| / max|ref| against float64, measured in
the interpreter (benchmarks/results/triton_precision_interpreter.csv; the interpreter computes the same
rounded products as the tensor cores, see benchmarks/triton_precision.py):
    None (default)  fp32 inputs: exact fp32 products (phi 2e-7..5e-7, K 9e-7), or TF32 as with True where
                    torch's fp32 matmul precision is "high" or "medium". bf16 inputs: one bf16 product,
                    as with True (the precision of torch's bf16 matmuls and of the CUDA backend's bf16
                    kernels). fp16 inputs: operands split into hi + lo bf16 parts, four tensor-core
                    products: as accurate as fp32 products (only the final rounding to fp16 remains; three,
                    without lo lo', until 2026-12-07: phi up to 0.46 off on tight clusters far apart).
    True            fp32: TF32 (phi 4e-4, K 9e-4, median 4e-5). bf16/fp16: one bf16 product of rounded
                    operands (phi 0.9e-2..1.1e-2, K 4e-2..6e-2, median 2e-3..5e-3).
    False           exact fp32 products for every input dtype (no tensor cores).
"""

if __name__ == "kernels":
    # This directory imported as a top-level `kernels`: a checkout's root is on sys.path (`python -m ...` or
    # `python -m pytest` run from it), and transformers probes for Hugging Face's `kernels` package by
    # importing whatever `kernels` it finds when no metadata names it. Stay empty there: importing the
    # kernels would import Triton (where it is missing, `import transformers.activations` failed with "No
    # module named 'triton'") and register the bmt_fast_triton ops a second time, from a second copy of
    # these modules. They are bmt_fast.kernels.
    __all__: list[str] = []
else:
    from .median import GRAM_MAX_PARTICLES, median_bandwidth_forward
    from .rbf_kernel import rbf_kernel_backward, rbf_kernel_forward, rbf_kernel_self_backward
    from .svgd_step import svgd_step_forward
    from .utils import INTERPRETING, TileConfig

    __all__ = [
        "GRAM_MAX_PARTICLES",
        "INTERPRETING",
        "TileConfig",
        "median_bandwidth_forward",
        "rbf_kernel_backward",
        "rbf_kernel_forward",
        "rbf_kernel_self_backward",
        "svgd_step_forward",
    ]
