"""RBF kernel matrix K[i, j] = exp(-|x_i - y_j|^2 / H) in Triton, forward and backward.

Forward: one (BLOCK_M x BLOCK_N) tile of K per program, distances by tl.dot on rows centred by the shift
of x (bmt_fast.reference.centre), d looped in BLOCK_D chunks.

Backward, with P = grad * K (D = squared distance, dK/dD = -K / H):
    grad_x = -(2/H) (rowsum(P) * xc - P @ yc)        grad_y = -(2/H) (colsum(P) * yc - P.T @ xc)
    grad_H = sum(P * D) / H^2 = -sum(P * log K) / H   (as the C++ kernel: no distance recomputation)
One kernel computes the gradient of either side: grad_y is grad_x of the transposed problem (the strides of
grad and K are swapped, no copy). Each program holds a block of rows and one chunk of d and streams the
other side's rows, so memory stays O(tile) beyond the n x m inputs.
"""

import torch
import triton
import triton.language as tl

from .centring import centring_shift
from .gram import gram_rbf_kernel
from .median import use_gram
from .tiles import dot_acc, dot_operand, load_bandwidth, load_centred, sq_dist_tile, to_output
from .utils import (
    GPU_TILES,
    MIN_BLOCK,
    SMALL_TILES,
    TileConfig,
    accumulation_dtype,
    cdiv,
    check_bandwidth,
    check_device,
    check_like,
    check_elements,
    check_grid_axis,
    check_rows,
    dot_mode,
    ensure_contiguous,
    next_power_of_2,
    tl_dtype,
    tunable,
    valid_bandwidth,
)

MAX_BLOCK_V = 128


@triton.jit
def _rbf_kernel_kernel(
    x_ptr,
    y_ptr,
    shift_ptr,
    h_ptr,
    out_ptr,
    n,
    m,
    d,
    stride_x,
    stride_y,
    stride_out,
    SELF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    MODE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d2 = sq_dist_tile(x_ptr, y_ptr, shift_ptr, rows, cols, n, m, d, stride_x, stride_y, SELF, BLOCK_M, BLOCK_N, BLOCK_D, ACC, MODE)
    k = tl.exp(d2 * (-1.0 / load_bandwidth(h_ptr, ACC)))
    mask = (rows < n)[:, None] & (cols < m)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], to_output(k, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rbf_kernel_grad_kernel(
    grad_ptr,
    k_ptr,
    a_ptr,
    b_ptr,
    shift_ptr,
    h_ptr,
    out_ptr,
    log_terms_ptr,
    n_a,
    n_b,
    d,
    stride_grad_a,
    stride_grad_b,
    stride_k_a,
    stride_k_b,
    stride_a,
    stride_b,
    SELF: tl.constexpr,
    SYMMETRISED: tl.constexpr,
    WITH_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
    MODE: tl.constexpr,
):
    """out[rows, vcols] = -(2/H) (rowsum(P) a_c - P @ b_c) over all rows of b; with WITH_H, the chunk-0
    programs also write sum_j P_ij log K_ij per row to log_terms. SELF (b is a): the own terms
    P_ii (a_i - a_i) = 0 are left out (next to P_ii ~ 1 the sums lost a row's terms of tiny K).
    SYMMETRISED (with SELF): the weights are (grad + grad^T) * K, grad^T's tile read where grad's is: out is
    then the sum of both sides' gradients, and the log terms count every pair twice."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    vcols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=ACC)
    rowsum = tl.zeros((BLOCK_M,), dtype=ACC)
    log_terms = tl.zeros((BLOCK_M,), dtype=ACC)
    for j0 in range(0, n_b, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        mask = (rows < n_a)[:, None] & (cols < n_b)[None, :]
        g = tl.load(grad_ptr + rows[:, None] * stride_grad_a + cols[None, :] * stride_grad_b, mask=mask, other=0.0)
        if SYMMETRISED:
            g_t = tl.load(grad_ptr + rows[:, None] * stride_grad_b + cols[None, :] * stride_grad_a, mask=mask, other=0.0)
            g = g.to(ACC) + g_t.to(ACC)
        k = tl.load(k_ptr + rows[:, None] * stride_k_a + cols[None, :] * stride_k_b, mask=mask, other=0.0).to(ACC)
        p = g.to(ACC) * k
        if SELF:
            p = tl.where(rows[:, None] == cols[None, :], 0.0, p)
        if WITH_H:
            log_terms += tl.sum(p * tl.log(tl.where(k > 0.0, k, 1.0)), axis=1)  # K = 0: P = 0, term 0
        p = dot_operand(p, MODE)
        rowsum += tl.sum(p, axis=1)
        b = dot_operand(load_centred(b_ptr, shift_ptr, cols, vcols, n_b, d, stride_b, ACC), MODE)
        acc = dot_acc(p, b, acc, MODE)
    a = load_centred(a_ptr, shift_ptr, rows, vcols, n_a, d, stride_a, ACC)
    grad = (acc - rowsum[:, None] * a) * (2.0 / load_bandwidth(h_ptr, ACC))
    out_mask = (rows < n_a)[:, None] & (vcols < d)[None, :]
    tl.store(out_ptr + rows[:, None] * d + vcols[None, :], to_output(grad, out_ptr.dtype.element_ty), mask=out_mask)
    if WITH_H:
        if tl.program_id(1) == 0:
            tl.store(log_terms_ptr + rows, log_terms, mask=rows < n_a)


_FORWARD = tunable(_rbf_kernel_kernel, key=["n", "m", "d"])
# (the gradient of a prompt against its particles: one row of a, M of b; small tiles first)
_GRAD = tunable(_rbf_kernel_grad_kernel, key=["n_a", "n_b", "d"], tiles=[*SMALL_TILES, *GPU_TILES])


def _check_inputs(x, y, h):
    check_rows("x", x)
    check_rows("y", y)
    check_like("x", x, "y", y)
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"y must have d = {x.shape[1]} columns like x, got {y.shape[1]}")
    if not isinstance(h, torch.Tensor) or h.numel() != 1:
        raise ValueError("bandwidth must be a tensor with one value")
    check_elements("K", x.shape[0] * y.shape[0])


@ensure_contiguous
def rbf_kernel_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidth: torch.Tensor,
    *,
    self_kernel: bool = False,
    allow_tf32: bool | None = None,
    tile: TileConfig | None = None,
    algorithm: str = "auto",
) -> torch.Tensor:
    """K (n, m) in x's dtype. self_kernel: y is x (exact zero distances, unit diagonal).

    algorithm: "gram" (the default up to GRAM_MAX_PARTICLES rows, x's and y's together) takes the distances
    from the split-K Gram pass of svgd_step's Gram path, which spreads d over the whole GPU; "tiled" one
    program per tile of K, d looped inside it (with 16 particles and d = 409,600: one program for all of x;
    a prompt against its particles, 1 x M: one program too).
    """
    _check_inputs(x, y, bandwidth)
    check_device(x)
    (n, d), m = x.shape, y.shape[0]
    acc = accumulation_dtype(x.dtype)
    h = check_bandwidth(bandwidth, x)
    rows = n if self_kernel else n + m
    if use_gram(rows, algorithm):
        return gram_rbf_kernel(x, None if self_kernel else y, centring_shift(x), h, dot_mode(x.dtype, allow_tf32), tile=tile)
    check_grid_axis("K's blocks of columns", cdiv(m, min(t.block_n for t in GPU_TILES)))  # (any tile tried)
    out = torch.empty((n, m), dtype=x.dtype, device=x.device)
    _FORWARD.launch(
        lambda meta: (cdiv(n, meta["BLOCK_M"]), cdiv(m, meta["BLOCK_N"])),
        tile=tile,
        x_ptr=x,
        y_ptr=y,
        shift_ptr=centring_shift(x),
        h_ptr=h,
        out_ptr=out,
        n=n,
        m=m,
        d=d,
        stride_x=x.stride(0),
        stride_y=y.stride(0),
        stride_out=out.stride(0),
        SELF=self_kernel,
        BLOCK_D=next_power_of_2(d, low=MIN_BLOCK, high=64),
        ACC=tl_dtype(acc),
        MODE=dot_mode(x.dtype, allow_tf32),
    )
    return out


def _grad_rows(grad, k, a, b, shift, h, *, transposed, self_kernel, with_h, mode, tile, symmetrised=False):
    """The gradient for the rows of a (x, or y with transposed=True), and the log terms of grad_H;
    self_kernel: b is a; symmetrised (b is a): the weights (grad + grad^T) * K, the sum of both sides."""
    n_a, d = a.shape
    acc = accumulation_dtype(a.dtype)
    out = torch.empty_like(a)
    log_terms = torch.empty(n_a if with_h else 1, dtype=acc, device=a.device)
    # (symmetrised fp64: grad^T's tile, pipelined, would take the 128-wide chunk past an H100's shared
    # memory at the fixed tile: 256 KiB, where 64 columns take 192 KiB as the two-set kernel's 128 do)
    wide = max(grad.element_size(), k.element_size(), a.element_size()) == 8
    block_v = next_power_of_2(d, low=MIN_BLOCK, high=MAX_BLOCK_V // 2 if symmetrised and wide else MAX_BLOCK_V)
    check_grid_axis("the gradient's column chunks", cdiv(d, block_v))
    grad_strides = grad.stride()[::-1] if transposed else grad.stride()
    k_strides = k.stride()[::-1] if transposed else k.stride()
    _GRAD.launch(
        lambda meta: (cdiv(n_a, meta["BLOCK_M"]), cdiv(d, block_v)),
        tile=tile,
        grad_ptr=grad,
        k_ptr=k,
        a_ptr=a,
        b_ptr=b,
        shift_ptr=shift,
        h_ptr=h,
        out_ptr=out,
        log_terms_ptr=log_terms,
        n_a=n_a,
        n_b=b.shape[0],
        d=d,
        stride_grad_a=grad_strides[0],
        stride_grad_b=grad_strides[1],
        stride_k_a=k_strides[0],
        stride_k_b=k_strides[1],
        stride_a=a.stride(0),
        stride_b=b.stride(0),
        SELF=self_kernel,
        SYMMETRISED=symmetrised,
        WITH_H=with_h,
        BLOCK_V=block_v,
        ACC=tl_dtype(acc),
        MODE=mode,
    )
    return out, log_terms if with_h else None


def rbf_kernel_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: torch.Tensor,
    bandwidth: torch.Tensor,
    *,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
    allow_tf32: bool | None = None,
    tile: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_y, grad_bandwidth); the ones output_mask leaves out are zeros (not computed).

    grad and kernel may have any strides (grad of a sum is an expanded tensor).
    """
    _check_backward_inputs(grad, x, y, kernel, bandwidth)
    # the same rows on both sides (a self kernel): their own terms are left out
    self_kernel = x is y or (x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride())
    x, y = x.contiguous(), y.contiguous()
    h = check_bandwidth(bandwidth, x)
    shift = centring_shift(x)
    mode = dot_mode(x.dtype, allow_tf32)
    want_x, want_y, want_h = output_mask
    grad_x, grad_y = torch.zeros_like(x) if not want_x else None, torch.zeros_like(y) if not want_y else None
    log_terms = None
    if want_x:
        grad_x, log_terms = _grad_rows(grad, kernel, x, y, shift, h, transposed=False, self_kernel=self_kernel,
                                       with_h=want_h, mode=mode, tile=tile)
    if want_y:
        with_h = want_h and log_terms is None
        grad_y, terms = _grad_rows(grad, kernel, y, x, shift, h, transposed=True, self_kernel=self_kernel,
                                   with_h=with_h, mode=mode, tile=tile)
        log_terms = terms if with_h else log_terms
    return grad_x, grad_y, _bandwidth_grad(want_h, log_terms, grad, kernel, x, bandwidth)


def _check_backward_inputs(grad, x, y, kernel, bandwidth):
    _check_inputs(x, y, bandwidth)
    check_device(x)
    for name, t in (("grad", grad), ("kernel", kernel)):
        if t.shape != (x.shape[0], y.shape[0]):
            raise ValueError(f"{name} must have shape ({x.shape[0]}, {y.shape[0]}), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}), got {t.device}")


def _bandwidth_grad(want_h, log_terms, grad, kernel, x, bandwidth, *, pairs_counted=1):
    """H's gradient -sum(P log K) / H from the kernel's per-row log terms (each pair counted pairs_counted
    times there), or from grad and K directly where no row gradient was computed (log_terms None)."""
    if not want_h:
        return torch.zeros_like(bandwidth)
    h = valid_bandwidth(bandwidth, x)
    if log_terms is None:
        p = grad.to(h.dtype) * kernel.to(h.dtype)
        log_terms, pairs_counted = p * torch.where(kernel > 0, kernel, 1).to(h.dtype).log(), 1
    return (log_terms.sum() * (-1.0 / (pairs_counted * h[0]))).to(bandwidth.dtype).reshape(bandwidth.shape)


def rbf_kernel_self_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    kernel: torch.Tensor,
    bandwidth: torch.Tensor,
    *,
    output_mask: tuple[bool, bool] = (True, True),
    allow_tf32: bool | None = None,
    tile: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_bandwidth) of K = rbf_kernel(x, x, H) with x on both sides: x's gradient is the sum of
    the two sides', from one pass with the weights (grad + grad^T) * K (grad^T's tiles read where grad's
    are; no n x n sum in memory) where rbf_kernel_backward makes two. Outputs left out are zeros."""
    _check_backward_inputs(grad, x, x, kernel, bandwidth)
    x = x.contiguous()
    h = check_bandwidth(bandwidth, x)
    want_x, want_h = output_mask
    grad_x, log_terms = None, None
    if want_x:
        grad_x, log_terms = _grad_rows(grad, kernel, x, x, centring_shift(x), h, transposed=False, self_kernel=True,
                                       with_h=want_h, mode=dot_mode(x.dtype, allow_tf32), tile=tile, symmetrised=True)
    if not want_x:
        grad_x = torch.zeros_like(x)
    # (the symmetrised weights count every pair twice in the log terms)
    return grad_x, _bandwidth_grad(want_h, log_terms, grad, kernel, x, bandwidth, pairs_counted=2)


@torch.library.custom_op("bmt_fast_triton::rbf_kernel", mutates_args=())
def rbf_kernel(
    x: torch.Tensor, y: torch.Tensor, bandwidth: torch.Tensor, self_kernel: bool = False, allow_tf32: bool | None = None
) -> torch.Tensor:
    """K[i, j] = exp(-|x_i - y_j|^2 / bandwidth); self_kernel: y is x (unit diagonal exactly)."""
    return rbf_kernel_forward(x, y, bandwidth, self_kernel=self_kernel, allow_tf32=allow_tf32)


@rbf_kernel.register_fake
def _(x, y, bandwidth, self_kernel=False, allow_tf32=None):
    _check_inputs(x, y, bandwidth)
    return x.new_empty((x.shape[0], y.shape[0]))


@torch.library.custom_op("bmt_fast_triton::rbf_kernel_backward", mutates_args=())
def rbf_kernel_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: torch.Tensor,
    bandwidth: torch.Tensor,
    output_mask: list[bool],
    allow_tf32: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_y, grad_bandwidth) of rbf_kernel; outputs left out by output_mask are zeros."""
    if len(output_mask) != 3:
        raise ValueError(f"output_mask must hold 3 flags, got {output_mask}")
    return rbf_kernel_backward(
        grad, x, y, kernel, bandwidth, output_mask=tuple(output_mask), allow_tf32=allow_tf32
    )


@rbf_kernel_backward_op.register_fake
def _(grad, x, y, kernel, bandwidth, output_mask, allow_tf32=None):
    _check_inputs(x, y, bandwidth)
    # contiguous, as the kernels write them (empty_like kept a transposed x's strides, which inductor then asserted)
    return _contiguous_like(x), _contiguous_like(y), torch.empty_like(bandwidth)


@torch.library.custom_op("bmt_fast_triton::rbf_kernel_self_backward", mutates_args=())
def rbf_kernel_self_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    kernel: torch.Tensor,
    bandwidth: torch.Tensor,
    output_mask: list[bool],
    allow_tf32: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_bandwidth) of rbf_kernel(x, x, H), x's the sum of both sides'; outputs left out are zeros."""
    if len(output_mask) != 2:
        raise ValueError(f"output_mask must hold 2 flags, got {output_mask}")
    return rbf_kernel_self_backward(grad, x, kernel, bandwidth, output_mask=tuple(output_mask), allow_tf32=allow_tf32)


@rbf_kernel_self_backward_op.register_fake
def _(grad, x, kernel, bandwidth, output_mask, allow_tf32=None):
    _check_inputs(x, x, bandwidth)
    return _contiguous_like(x), torch.empty_like(bandwidth)


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, y, bandwidth, self_kernel, allow_tf32 = inputs
    ctx.save_for_backward(x, y, bandwidth, output)
    # x given on both sides (rbf_kernel(x)): its gradient in one pass. (Decided here, by identity: the
    # backward may run on fake tensors under torch.compile, whose data pointers say nothing.)
    ctx.one_pass = self_kernel and x is y
    ctx.allow_tf32 = allow_tf32


def _backward(ctx, grad):
    from bmt_fast import reference
    from bmt_fast.backends import vjp_by_ops

    x, y, bandwidth, kernel = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    other = None if ctx.one_pass else y
    if torch.is_grad_enabled():
        # create_graph=True (double backward, Hessian-vector products): the backward ops have no derivative
        # (it had raised "no autograd formula"); the differentiable formula from K, as the compiled backends'
        grads = reference.rbf_kernel_vjp(grad, x, other, bandwidth, kernel, needs)
    else:
        grads = vjp_by_ops(rbf_kernel_self_backward_op, rbf_kernel_backward_op, grad, x, other, bandwidth, kernel,
                           needs, ctx.allow_tf32)  # fmt: skip
    return (*(g if need else None for g, need in zip(grads, needs)), None, None)


torch.library.register_autograd("bmt_fast_triton::rbf_kernel", _backward, setup_context=_setup_context)
