"""bmt_fast: fused SVGD step and RBF kernel as torch ops, and Bayesian multi-task prompt transfer.

    phi = bmt_fast.svgd_step(x, score, bandwidth="median", backend="auto")
    K   = bmt_fast.rbf_kernel(x, y=None, bandwidth="median", backend="auto")
    H   = bmt_fast.median_bandwidth(x, method="exact")
    opt = bmt_fast.SVGD(particles, torch.optim.Adam, lr=1e-2); opt.step(score)
"""

from .backends import available_backends
from .memory import empty_cache, memory_stats
from .ops import median_bandwidth, rbf_kernel, svgd_step
from .optim import SVGD
from .reference import BANDWIDTH_FLOOR
from . import triton_backend  # noqa: F401,E402  registers backend "triton" (imports Triton lazily)

__version__ = "0.1.0"

__all__ = [
    "BANDWIDTH_FLOOR",
    "SVGD",
    "available_backends",
    "empty_cache",
    "median_bandwidth",
    "memory_stats",
    "rbf_kernel",
    "svgd_step",
    "__version__",
]
