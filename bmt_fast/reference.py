"""Readable pure-torch SVGD math: the oracle every backend is tested against.

Everything here is written for clarity, not speed. It materialises the n x m kernel matrix, so it is only
meant for moderate sizes (tests run it in float64). The formulas are exactly those of the design guide:

    k(a, b)  = exp(-||a - b||^2 / H)
    phi_i    = (1/n) * sum_j [ k(x_j, x_i) * g_j + (2/H) * k(x_j, x_i) * (x_i - x_j) ]
    "median" = median(all n*n squared distances, diagonal zeros included) / log(n + 1)
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

# H never goes below this (in squared-distance units). It only matters when more than half of all particle
# pairs coincide, which makes the median zero; the value is far below any legitimate bandwidth.
BANDWIDTH_FLOOR = 1e-12


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other floating dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def centre(x: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Shift x (and others by the same vector) so the norm-expansion of distances does not cancel.

    The shift is x[0] + mean(x - x[0]): exact zeros for identical particles, and the mean of the cloud
    otherwise. SVGD and the RBF kernel are translation invariant, so the shift does not change results.
    """
    shifted = [t - x[:1] for t in (x, *others)]
    mean = shifted[0].mean(0, keepdim=True)
    return tuple(t - mean for t in shifted)


def pairwise_sq_dists(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances between rows, (n, m), clamped at zero; exact zero diagonal if y is None."""
    same = y is None
    if same:
        (xc,) = centre(x)
        yc = xc
    else:
        xc, yc = centre(x, y)
    d2 = (xc * xc).sum(1, keepdim=True) + (yc * yc).sum(1) - 2.0 * xc @ yc.T
    d2 = d2.clamp_min(0.0)
    if same:
        d2.diagonal().zero_()  # (fill_diagonal_ has no functionalization: torch.func.functionalize refused it)
    return d2


def numpy_median(values: torch.Tensor) -> torch.Tensor:
    """numpy.median convention: the mean of the two middle values for an even count. (By selection, not
    a full sort: 65,536 sampled distances on a 2-core CPU took ~10 ms to sort.) NaN if any value is NaN or
    infinite: squared distances are so only for particles that hold NaN or Inf (or overflow), where the
    compiled backends' median is NaN too (kthvalue alone would rank a NaN above every number)."""
    flat = values.reshape(-1)
    count = flat.numel()
    finite = torch.isfinite(flat).all()  # (a tensor: no host synchronisation on a GPU)
    upper = flat.kthvalue(count // 2 + 1).values
    traced = _traced(count)
    if not traced and count % 2:
        median = upper
    else:
        # The lower middle value: the largest one below `upper`, unless `upper` also holds rank count/2 - 1
        # (fewer than count/2 values lie below it). One selection and two elementwise passes. (A symbolic
        # count, traced by torch.compile(dynamic=True) or export: both cases, chosen by a tensor, so the
        # graph does not specialise on the parity of n.)
        below = flat < upper
        largest_below = flat.masked_fill(~below, -math.inf).max()
        lower = torch.where(below.sum() >= count // 2, largest_below, upper)
        median = 0.5 * (lower + upper)
        if traced:
            median = torch.where(torch.full((), count % 2, device=flat.device) == 1, upper, median)
    return torch.where(finite, median, math.nan)


def _traced(size) -> bool:
    """Whether a size may be symbolic: traced by torch.compile (where dynamo takes a SymInt for an int) or
    torch.export / make_fx; there the median rule computes on tensors, not Python numbers, so that the graph
    does not specialise on n (math.log(n + 1) had fixed n; a branch on the parity of n * n, that parity)."""
    return torch.compiler.is_compiling() or not isinstance(size, int)


def bandwidth_from_median(median: torch.Tensor, n: int) -> torch.Tensor:
    """The SVGD authors' rule H = median / log(n + 1), floored at BANDWIDTH_FLOOR."""
    if not _traced(n):
        return (median / math.log(n + 1)).clamp_min(BANDWIDTH_FLOOR)
    # a symbolic n (torch.compile(dynamic=True), export): the log on a tensor (math.log had fixed n)
    return (median / torch.full((), n + 1, dtype=median.dtype, device=median.device).log()).clamp_min(BANDWIDTH_FLOOR)


def median_bandwidth(x: torch.Tensor) -> torch.Tensor:
    """Exact median-rule bandwidth of particles x (n, d) over all n*n pairs."""
    x = x.to(accumulation_dtype(x.dtype))
    return bandwidth_from_median(numpy_median(pairwise_sq_dists(x)), x.shape[0])


# Values of one block of pair differences in sampled_median_bandwidth (16 MiB in fp32).
SAMPLE_BLOCK_VALUES = 1 << 22


def sampled_median_bandwidth(
    x: torch.Tensor, num_pairs: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Median-rule bandwidth from `num_pairs` pairs (i, j) drawn uniformly from all n*n pairs. The pair
    differences are formed a block of pairs at a time: memory O(num_pairs + SAMPLE_BLOCK_VALUES), not
    O(num_pairs * d) (65,536 pairs of 409,600-dimensional soft prompts would be 107 GB)."""
    x = x.to(accumulation_dtype(x.dtype))
    n, d = x.shape
    i = torch.randint(n, (num_pairs,), generator=generator, device="cpu").to(x.device)
    j = torch.randint(n, (num_pairs,), generator=generator, device="cpu").to(x.device)
    d2 = torch.empty(num_pairs, dtype=x.dtype, device=x.device)
    block = max(1, SAMPLE_BLOCK_VALUES // d)
    first = torch.empty(min(block, num_pairs), d, dtype=x.dtype, device=x.device)  # reused by every block
    second = torch.empty_like(first)
    for start in range(0, num_pairs, block):
        end = min(num_pairs, start + block)
        a, b = first[: end - start], second[: end - start]
        torch.index_select(x, 0, i[start:end], out=a)
        torch.index_select(x, 0, j[start:end], out=b)
        a.sub_(b)  # the differences themselves: no cancellation, exact zeros for i == j
        torch.sum(a.square_(), dim=1, out=d2[start:end])
    return bandwidth_from_median(numpy_median(d2), n)


def rbf_kernel(x: torch.Tensor, y: torch.Tensor | None, bandwidth: torch.Tensor) -> torch.Tensor:
    """k(x_i, y_j) = exp(-||x_i - y_j||^2 / H) as an (n, m) matrix; differentiable in x, y and H."""
    return torch.exp(-pairwise_sq_dists(x, y) / bandwidth)


def autocast_off(t: torch.Tensor):
    """A context in which a caller's torch.autocast leaves t's device alone: the formulas here as written (fp32
    sums for fp32 and 16-bit inputs), where autocast had made their matmuls 16-bit (phi and gradients ~3e-3
    off for fp32 particles under bf16 autocast; the compiled kernels, which autocast leaves alone, 1e-7)."""
    if torch.amp.is_autocast_available(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def _without_autocast(x_position: int):
    """The decorated formula run under autocast_off(x), x its argument at x_position."""

    def decorate(formula):
        @functools.wraps(formula)
        def run(*args, **kwargs):
            with autocast_off(args[x_position] if x_position < len(args) else kwargs["x"]):
                return formula(*args, **kwargs)

        return run

    return decorate


@_without_autocast(1)
def rbf_kernel_vjp(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    bandwidth: torch.Tensor,
    kernel: torch.Tensor,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_x, grad_y, grad_bandwidth) of K = rbf_kernel(x, y, H) for dL/dK = grad, from K itself; each None
    where `needs` (three flags) says so. y None: the self kernel, whose x gradient sums both sides'.

    With W = grad * K: grad_x_i = -(2/H) sum_j W_ij (x_i - y_j), grad_y_j = (2/H) sum_i W_ij (x_i - y_j) and
    grad_H = sum_ij W_ij |x_i - y_j|^2 / H^2. Plain torch ops (n x m in memory), so autograd and every
    torch.func transform differentiate and batch it again; a K with autograd history (the forward's output)
    carries the second derivatives through it."""
    need_x, need_y, need_h = needs
    acc = accumulation_dtype(x.dtype)
    h = bandwidth.to(acc)
    w = grad.to(acc) * kernel.to(acc)
    same = y is None
    if same:
        need_x, need_y = need_x or need_y, False
        (xc,) = centre(x.to(acc))
        w = w + w.T  # both sides' weights: K is symmetric
        yc = xc
    else:
        xc, yc = centre(x.to(acc), y.to(acc))
    scale = 2.0 / h
    grad_x = grad_y = grad_h = None
    if need_x:
        grad_x = (scale * (w @ yc - w.sum(1, keepdim=True) * xc)).to(x.dtype)
    if need_y:
        grad_y = (scale * (w.T @ xc - w.sum(0).unsqueeze(1) * yc)).to(y.dtype)
    if need_h:
        pairs = 0.5 if same else 1.0  # (w counts every pair twice for a self kernel)
        grad_h = (pairs * (w * pairwise_sq_dists(xc, None if same else yc)).sum() / (h * h)).to(bandwidth.dtype)
    return grad_x, grad_y, grad_h


@_without_autocast(0)
def rbf_kernel_jvp(
    x: torch.Tensor,
    y: torch.Tensor | None,
    bandwidth: torch.Tensor,
    kernel: torch.Tensor,
    tangents: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
) -> torch.Tensor:
    """The forward-mode derivative of K = rbf_kernel(x, y, H) along the tangents (t_x, t_y, t_H), each None
    for none; y None: the self kernel (t_y is t_x). dK_ij = K_ij (-dD_ij / H + D_ij dH / H^2) with
    dD_ij = 2 (x_i - y_j) . (t_x_i - t_y_j). Plain torch ops, as rbf_kernel_vjp."""
    t_x, t_y, t_h = tangents
    acc = accumulation_dtype(x.dtype)
    h = bandwidth.to(acc)
    same = y is None
    if same:
        (xc,) = centre(x.to(acc))
        yc, t_y = xc, t_x
    else:
        xc, yc = centre(x.to(acc), y.to(acc))
    exponent = torch.zeros_like(kernel, dtype=acc)
    if t_x is not None:
        t_x = t_x.to(acc)
        exponent = exponent + (xc * t_x).sum(1, keepdim=True) - t_x @ yc.T
    if t_y is not None:
        t_y = t_y.to(acc)
        exponent = exponent + (yc * t_y).sum(1) - xc @ t_y.T
    exponent = exponent * (-2.0 / h)
    if t_h is not None:
        exponent = exponent + pairwise_sq_dists(xc, None if same else yc) * (t_h.to(acc) / (h * h))
    return (kernel.to(acc) * exponent).to(kernel.dtype)


def svgd_step(x: torch.Tensor, score: torch.Tensor, bandwidth: torch.Tensor | None) -> torch.Tensor:
    """The SVGD direction phi for particles x (n, d) with scores (n, d); bandwidth None = median rule."""
    dtype = accumulation_dtype(x.dtype)
    x, score = x.to(dtype), score.to(dtype)
    h = median_bandwidth(x) if bandwidth is None else bandwidth.to(dtype)
    (xc,) = centre(x)
    k = rbf_kernel(x, None, h)
    attraction = k @ score
    repulsion = (2.0 / h) * (xc * k.sum(1, keepdim=True) - k @ xc)
    return (attraction + repulsion) / x.shape[0]
