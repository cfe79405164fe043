"""Public ops: svgd_step, rbf_kernel, median_bandwidth."""

from __future__ import annotations

import torch

from . import _extension, _functorch, backends, reference
from ._validation import (
    all_finite,
    as_rows,
    check_bandwidth,
    check_choice,
    check_finite,
    check_out,
    check_particles,
    check_same,
    fold_may_overflow,
    fold_overflow_error,
    fold_overflows,
    positive_count,
    readable,
)

DEFAULT_NUM_PAIRS = 65536


def svgd_step(
    x: torch.Tensor,
    score: torch.Tensor,
    bandwidth: str | float | torch.Tensor = "median",
    *,
    backend: str = "auto",
    check_inputs: bool = True,
    group: "torch.distributed.ProcessGroup | None" = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The SVGD update direction phi for particles x with scores ∇log p(x).

        phi_i = (1/n) sum_j [ k(x_j, x_i) score_j + (2/H) k(x_j, x_i) (x_i - x_j) ],  k(a,b) = exp(-|a-b|²/H)

    Args:
        x: particles, shape (n, *event); flattened to (n, d) inside. float32/float64/bfloat16/float16.
        score: ∇ log p at each particle, same shape, dtype and device as x.
        bandwidth: "median" (H = median of all n*n squared distances / log(n + 1), floored at
            `reference.BANDWIDTH_FLOOR`), or a positive float / 0-dim tensor H.
        backend: "auto", or one of `available_backends()`.
        check_inputs: set False to skip the NaN/Inf check (one extra pass over x and one over score; on
            the CPU, the CUDA Gram path with n <= 16 and the Triton one, n <= 256, at most one pass over
            phi: the kernel tracks whether phi is finite as it writes it (or, on two CPU paths, the op
            scans phi once), any NaN/Inf input reaching phi there, and the inputs are scanned only when
            it is not; on a GPU reading that flag is the call's one host synchronisation) and the host
            read of a tensor bandwidth (for speed, and for torch.compile without graph breaks).
        group: a torch.distributed process group (e.g. `torch.distributed.group.WORLD`) whose ranks each
            hold a slice of the particles (any number of rows, 0 included; same event shape and dtype).
            Every rank calls svgd_step with its slice and gets phi for its own rows, equal to the
            single-process op on the slices concatenated in rank order. The particles are all-gathered;
            "median" is computed over all N particles on the group's first rank and broadcast (exact for
            N <= `bmt_fast.distributed.EXACT_MEDIAN_MAX_PARTICLES`, from 65,536 sampled pairs beyond). Bad
            input on any rank raises the same error on every rank. None: the single-process op.
        out: a contiguous tensor with the shape, dtype and device of x, not sharing memory with x or
            score, that receives phi (and is returned): no allocation at all, in memory the caller
            chose. (Without it, a fresh result must be paged in by the OS: on a 2-core VM, n=16,
            d=409,600, 6,400 page faults, ~11 ms on top of a ~6 ms step. The CPU backend therefore takes
            results and temporaries of 1 MiB or more from huge pages and reuses freed ones, so a loop pays
            that once.) The CPU kernels write out directly (but for 16-bit particles off AMX and fp64 ones
            with many particles and d > 256), so do the CUDA Gram path for n <= 16 and the Triton one
            (n <= 256); elsewhere the result is copied in.
            If a NaN/Inf error is raised after the kernel ran (where the kernel's flag is checked, not
            the inputs), out holds that phi.

    Returns:
        phi with the shape, dtype and device of x. Half-precision inputs accumulate in float32. fp32 inputs
        follow torch's fp32 matmul precision where the kernels multiply matrices: with
        torch.set_float32_matmul_precision("medium") many particles on a CPU with AMX take the bf16 path
        (bf16-rounded operands, fp32 sums and result; errors of a few 1e-3), as ATen's own fp32 GEMMs do
        then, and the Triton backend's tensor-core products are TF32 under "high" or "medium"; the
        default ("highest") is IEEE fp32 (README, "Numerics").

    This is a no-grad op: it runs under torch.no_grad() and its result has no autograd history. Particles
    move by x <- x + lr * phi (or give -phi to a torch optimizer as the gradient, as `bmt_fast.SVGD` does).
    Under torch.func.vmap it steps each particle set of the batch as a single call would (README, "torch.func").
    """
    if check_inputs and torch.compiler.is_compiling():  # (its checks read values back: run eagerly)
        return _eager("svgd_step")(x, score, bandwidth, backend=backend, check_inputs=True, group=group, out=out)
    if _functorch.active():  # inside torch.func.vmap / grad / ...: the op per batch entry, no gradient
        return _functorch.svgd_step(x, score, bandwidth, backend=backend, check_inputs=check_inputs, group=group, out=out)
    return _svgd_step(x, score, bandwidth, backend, check_inputs, group, out)


def _svgd_step(x, score, bandwidth, backend, check_inputs, group, out, *, fresh_out: bool = False) -> torch.Tensor:
    """svgd_step outside torch.func transforms; fresh_out: `out` is a new contiguous tensor of x's shape,
    dtype and device that autograd does not track (the caller made it), so it is not checked."""

    def checked(min_rows: int):
        h = _checked_bandwidth(x, score, bandwidth, check_inputs, min_rows=min_rows)
        if out is not None and not fresh_out:
            check_out(out, x, score)
        return h

    if group is not None:  # every rank learns of any rank's bad input, NaN included (see distributed)
        from . import distributed

        distributed.check_group(group)
        with distributed.failing_together(group):  # this rank's own checks: a failure raises on every rank
            h = checked(min_rows=0)
            distributed.check_backend(backend, x)
        with torch.no_grad():  # (detached: no forward-mode tangent either)
            phi = distributed.svgd_step(
                x.detach(), score.detach(), None if h is None else h.detach(), group=group, backend=backend,
                check_inputs=check_inputs,
            )
            return phi if out is None else out.copy_(phi)
    h = checked(min_rows=1)
    x2 = as_rows(x)
    return _step_on(backends.select(backend, "svgd_step", x2), x, score, h, check_inputs, out, x2)


def _checked_bandwidth(x, score, bandwidth, check_inputs, *, min_rows: int = 1):
    """svgd_step's argument checks (x and score as particles of one shape, dtype and device; the bandwidth,
    its value too where check_inputs): the checked bandwidth (None: the median)."""
    check_particles("x", x, min_rows=min_rows)
    check_particles("score", score, min_rows=min_rows)
    check_same("x", x, "score", score)
    return check_bandwidth(bandwidth, x, check_value=check_inputs)


def _step_on(chosen, x, score, h, check_inputs, out, x2=None) -> torch.Tensor:
    """_svgd_step past its argument checks: phi by the backend `chosen` for x and score as validated there
    (shapes, dtypes, devices; out, if given, checked or fresh), h the checked bandwidth (None: the median)."""
    # Detached: no autograd history, and no forward-mode tangent either (no_grad leaves forward AD on: the
    # reference backend's torch ops had carried one through, where the compiled kernels give none)
    x2 = (as_rows(x) if x2 is None else x2).detach()
    s2 = as_rows(score).detach()
    h = None if h is None else h.detach()  # (read as a float below: a learnable H had warned there)

    def check_both():
        check_finite("x", x)
        check_finite("score", score)

    # Where any NaN/Inf in the inputs is known to reach phi, the kernel writes phi in place and tracks its
    # finiteness as it goes: that flag decides, and the inputs are scanned only when it is not finite:
    # to name the bad one, or to find them finite (an overflow: phi is returned).
    flagged = (
        (check_inputs or out is not None)
        and chosen.svgd_step_spreads_non_finite(x2)
        and not _functorch.functionalizing()
        and _has_values(x2)  # (fake tensors: no flag to read back)
    )
    post_check = check_inputs and flagged
    if check_inputs and not post_check:
        check_both()
    # A backend without the flag (Triton beyond its Gram path) returns the NaN phi of a given H too small for
    # the fold, where the CPU's raises: phi is scanned where the shape and H allow that at all. H is read here,
    # where the scans have just synchronised a GPU, not after the step's launch, which had waited for the step.
    scan_for_fold = (
        check_inputs and not post_check and h is not None and _has_values(h) and fold_may_overflow(x2, float(h))
    )
    finite = None
    target = None if out is None else out if out.dim() == 2 else out.view(x2.shape)
    try:
        if flagged and (target is not None or post_check):  # in place, the flag for free
            phi = chosen.empty_result(x2) if target is None else target
            finite = chosen.svgd_step_into(x2, s2, h, phi)
        else:  # elsewhere the result is copied into out (no scan for a flag nobody reads)
            phi = chosen.svgd_step(x2, s2, h)
            if target is not None:
                phi = target.copy_(phi)
    except Exception:
        if post_check:  # e.g. a NaN median bandwidth: the clear error about the input comes first
            check_both()
        raise
    if post_check and not (all_finite(phi) if finite is None else bool(finite)):
        check_both()
        if h is not None and fold_overflows(x2, float(h)):  # (finite inputs: not an overflow of phi itself)
            raise fold_overflow_error(float(h), x.dtype)
    elif scan_for_fold and not all_finite(phi):  # (the inputs scanned before: finite)
        if fold_overflows(x2, float(h)):
            raise fold_overflow_error(float(h), x.dtype)
    return out if out is not None else phi if x.dim() == 2 else phi.reshape(x.shape)


def _has_values(t: torch.Tensor) -> bool:
    """Whether t's values can be read here: not a meta or fake tensor, nor one traced by torch.compile."""
    return not torch.compiler.is_compiling() and readable(t)


def _steps_on(chosen, x, score, h, check_inputs, out) -> torch.Tensor:
    """_step_on for B particle sets at once, by a backend whose steps_batches holds: x and score (B, n, *event)
    of one shape, dtype and device, the first set's checked as a single call checks its own; h None (the
    median rule) or (B,), each set's bandwidth checked; out a fresh contiguous tensor of x's shape. Where the
    kernels flag each set's phi as they write it (svgd_step_spreads_non_finite: the CPU's), a set whose phi
    is not finite has its inputs scanned, to name the bad one as a single call on it would; elsewhere every
    set's inputs are scanned first, all sets in one pass over each of x and score (on a GPU one host sync
    each, not two per set)."""
    sets, n = x.shape[:2]
    x3, s3 = x.reshape(sets, n, -1), score.reshape(sets, n, -1)

    def check_sets(indices):
        for index in indices:
            check_finite("x", x[index])
            check_finite("score", score[index])

    post_check = check_inputs and chosen.svgd_step_spreads_non_finite(x3[0])
    if check_inputs and not post_check and not (all_finite(x) and all_finite(score)):
        check_sets(range(sets))
    try:  # (detached inputs and a fresh out: nothing for autograd to record)
        finite = chosen.svgd_step_batched_into(x3.detach(), s3.detach(), h, out.view(x3.shape))
    except Exception:
        if post_check:  # e.g. a NaN median bandwidth: the clear error about the input comes first
            check_sets(range(sets))
        raise
    if post_check and not bool(finite.all()):
        for index in torch.nonzero(~finite).flatten().tolist():  # in order: a loop's first error first
            check_sets([index])
            if h is not None and fold_overflows(x3[index], float(h[index])):  # finite: a given H too small?
                raise fold_overflow_error(float(h[index]), x.dtype)
    return out


def rbf_kernel(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    bandwidth: str | float | torch.Tensor = "median",
    *,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """RBF kernel matrix K[i, j] = exp(-||x_i - y_j||² / H), shape (n, m); y=None means y = x.

    Differentiable in x, y and a tensor bandwidth. With "median", H = median_bandwidth(y if given else x),
    the bandwidth of the reference set (as for a kernel density estimate over y), treated as a constant.
    fp32 inputs follow torch.set_float32_matmul_precision as svgd_step does. Works under torch.func
    transforms too: vmap (per batch entry), grad / vjp / jacrev / hessian (README, "torch.func").
    """
    if check_inputs and torch.compiler.is_compiling():  # (its checks read values back: run eagerly)
        return _eager("rbf_kernel")(x, y, bandwidth, backend=backend, check_inputs=True)
    if _functorch.active() or _functorch.forward_ad_active():
        return _functorch.rbf_kernel(x, y, bandwidth, backend, check_inputs)
    return _rbf_kernel(x, y, bandwidth, backend, check_inputs)[0]


def _rbf_kernel(x, y, bandwidth, backend: str, check_inputs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """rbf_kernel's K and the bandwidth it used (a 0-dim tensor: the median's, or the one given)."""
    check_particles("x", x)
    if y is not None:
        check_particles("y", y)
        check_same("x", x, "y", y, shape=False)
        if y.shape[1:] != x.shape[1:]:
            raise ValueError(f"y must have the event shape of x {tuple(x.shape[1:])}, got {tuple(y.shape[1:])}")
    if check_inputs:
        check_finite("x", x)
        if y is not None and y is not x:  # rbf_kernel(x, x): one scan, not two
            check_finite("y", y)
    h = check_bandwidth(bandwidth, x, check_value=check_inputs)
    x2 = as_rows(x)
    y2 = None if y is None else as_rows(y)
    chosen = backends.select_rbf_kernel(backend, x2, y2)
    if h is None:
        if y2 is None:
            return chosen.rbf_kernel_median(x2)
        with torch.no_grad():
            h = chosen.median_bandwidth(y2)
    return chosen.rbf_kernel(x2, y2, h), h


def median_bandwidth(
    x: torch.Tensor,
    *,
    method: str = "exact",
    num_pairs: int = DEFAULT_NUM_PAIRS,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """The median-rule bandwidth H = median(squared pairwise distances) / log(n + 1), floored.

    method="exact": the numpy.median of all n*n squared distances (diagonal zeros included). The compiled
        backends select it without materialising the n x n matrix (a few streaming passes).
    method="sampled": the median of `num_pairs` pairs (i, j) drawn uniformly (with replacement) from all
        n*n pairs, costing O(num_pairs * d) time and O(num_pairs) memory. Its relative error has standard
        deviation about 1 / (2 * f(m) * m * sqrt(num_pairs)) for a density f of squared distances with
        median m. For a Gaussian cloud this is 2.33 / sqrt(num_pairs) at d=1 (squared distances 2 chi^2_1),
        1.44 at d=2, 1.13 at d=3 and less beyond, i.e. 0.9% at d=1 and at most 0.6% for d >= 2 at the
        default 65,536 pairs: 3 standard deviations stay within 2.7% and 2%.
        Where the exact median costs less than the samples it is returned instead: with no more pairs than
        samples (n*n <= num_pairs), and on the CPU backend up to n*n <= 64 * num_pairs (n = 2048 at the
        default; on a 2-core Xeon, n = 2048, d = 256: 13 ms exact, 36 ms sampled). `generator`, if given,
        is a CPU torch.Generator whatever x's device: the pairs are drawn on the CPU, so a seed gives the
        same pairs on every device.

    Returns a 0-dim tensor: float64 for float64 input, float32 otherwise, on x's device. Under
    torch.func.vmap, one per batch entry; "sampled" follows vmap's `randomness` (README, "torch.func").
    """
    if check_inputs and torch.compiler.is_compiling():  # (its checks read values back: run eagerly)
        return _eager("median_bandwidth")(
            x, method=method, num_pairs=num_pairs, generator=generator, backend=backend, check_inputs=True
        )
    if _functorch.active():
        return _functorch.median_bandwidth(x, method, num_pairs, generator, backend, check_inputs)
    check_particles("x", x)
    check_choice("method", method, ("exact", "sampled"))
    if check_inputs:
        check_finite("x", x)
    x2 = as_rows(x).detach()  # (no forward-mode tangent either: no_grad leaves forward AD on)
    with torch.no_grad():
        if method == "sampled":
            pairs = positive_count(num_pairs)
            if pairs is None:
                raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}")
            num_pairs = pairs
            if generator is not None and not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        chosen = backends.select(backend, "median_bandwidth", x2)
        if method == "sampled" and draws_pairs(x2.shape[0], num_pairs, chosen):
            return reference.sampled_median_bandwidth(x2, num_pairs, generator)
        return chosen.median_bandwidth(x2)


def draws_pairs(n: int, num_pairs: int, chosen: backends.Backend) -> bool:
    """Whether median_bandwidth(method="sampled") samples pairs (otherwise the exact median costs less)."""
    return n * n > num_pairs * chosen.exact_median_pair_factor


def _rbf_kernel_setup_context(ctx, inputs, output):
    x, y, h = inputs
    ctx.self_kernel = x is y
    ctx.save_for_backward(x, y, h, output)


def _rbf_backward(grad, x, y, h, k, self_kernel: bool, needs) -> tuple:
    """(grad_x, grad_y, grad_h) of K = rbf_kernel(x, y, h), each None where needs says so (self kernel: x's
    two row gradients summed, as grad_x). Under create_graph=True (double backward, Hessian-vector
    products) by the differentiable formula from K (n x m in memory: the compiled backward ops have no
    derivative of their own), otherwise by the compiled backward ops."""
    other = None if self_kernel else y
    if torch.is_grad_enabled():
        return reference.rbf_kernel_vjp(grad, x, other, h, k, needs)
    return backends.compiled_rbf_kernel_vjp(grad, x, other, h, k, needs)


def _rbf_kernel_backward(ctx, grad):
    x, y, h, k = ctx.saved_tensors
    return _rbf_backward(grad, x, y, h, k, ctx.self_kernel, ctx.needs_input_grad[:3])


def _rbf_kernel_median_setup_context(ctx, inputs, output):
    (x,) = inputs
    k, h = output
    ctx.mark_non_differentiable(h)
    ctx.save_for_backward(x, h, k)


def _rbf_kernel_median_backward(ctx, grad, _grad_h):
    """rbf_kernel(x, x, H) with the median H a constant: the sum of x's two row gradients."""
    x, h, k = ctx.saved_tensors
    need = ctx.needs_input_grad[0]
    grad_x, grad_y, _ = _rbf_backward(grad, x, x, h, k, True, (need, need, False))
    return grad_x if grad_y is None else grad_x + grad_y


def _register_autograd() -> None:
    """rbf_kernel of the compiled backends is differentiable through a compiled backward op."""
    if _extension.CPU.loaded:
        torch.library.register_autograd(
            "bmt_fast::rbf_kernel", _rbf_kernel_backward, setup_context=_rbf_kernel_setup_context
        )
        torch.library.register_autograd(
            "bmt_fast::rbf_kernel_median", _rbf_kernel_median_backward, setup_context=_rbf_kernel_median_setup_context
        )


_register_autograd()

_EAGER: dict = {}
_PUBLIC = {"svgd_step": svgd_step, "rbf_kernel": rbf_kernel, "median_bandwidth": median_bandwidth}


def _eager(name: str):
    """The public op `name` with its checks on, as torch.compile meets it: a call that dynamo runs eagerly. The
    checks read values back (the NaN/Inf scans' .item(), a tensor bandwidth's value, the kernels' finiteness
    flag): traced, each was a graph break with torch's warnings (a logged one for every .item(), a UserWarning
    for the CPU allocator's call), several per call and partial graphs between them, the same work in the end;
    inside a traced torch.func transform, vmap's error ("calling .item() on a Tensor"). Now one silent break
    (under fullgraph=True an error that gives the reason): the call runs as it does uncompiled. torch.export
    cannot leave a call out of its program: there the error says what to pass."""
    if getattr(torch.compiler, "is_exporting", lambda: False)():  # (torch >= 2.6)
        raise RuntimeError(
            f"bmt_fast.{name} with check_inputs=True cannot be exported: its NaN/Inf checks read values back "
            f"(a data-dependent branch); pass check_inputs=False to export it"
        )
    _make_eager(name)
    return _EAGER[name]


def _make_eager(name: str) -> bool:
    """Makes _EAGER[name], the disabled call, when first needed (made on import, it had imported dynamo with
    bmt_fast: seconds). Dynamo runs it as it is, not traced (assume_constant_result's mark, set without importing
    dynamo), so the call to torch.compiler.disable is not in the traced code (a graph break of its own there)."""
    if name not in _EAGER:
        reason = f"bmt_fast.{name}'s input checks read values back; pass check_inputs=False for one graph"
        try:
            _EAGER[name] = torch.compiler.disable(_PUBLIC[name], reason=reason)
        except TypeError:  # (torch < 2.8: no reason)
            _EAGER[name] = torch.compiler.disable(_PUBLIC[name])
    return True


_make_eager._dynamo_marked_constant = True  # type: ignore[attr-defined]
