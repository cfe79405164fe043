"""The public ops under torch.func transforms (vmap, grad, vjp, jacrev, hessian, ...).

Outside a transform the public functions call their backend as always; inside one they go through the
autograd.Functions below, which torch.func can transform (torch's own `register_autograd` rule cannot:
pytorch/pytorch#168393):

* vmap: the op runs once per batch entry, on the batch dimension's slices, and the results are stacked
  (so every entry is validated and computed exactly as a single call would be); svgd_step on the compiled
  backends (CPU, CUDA) runs all sets in one batched op (torch.ops.bmt_fast.svgd_step_batched_into), each
  set's phi the single op's bit for bit;
* grad / vjp: rbf_kernel's backward is the chosen backend's own backward kernel where nothing differentiates
  the gradient again (one level of grad or vjp), and the differentiable pure-torch formula from K
  (reference.rbf_kernel_vjp, n x m in memory) under nested or batched transforms (jacrev, hessian,
  vmap(grad(...)), grad(grad(...))). svgd_step and median_bandwidth have no gradient, as outside.
* jvp / jacfwd (and hessian, jacfwd of jacrev): rbf_kernel's forward-mode derivative by the pure-torch
  formula from K (reference.rbf_kernel_jvp).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.autograd.forward_ad as forward_ad

_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
try:  # what autograd.Function.apply reaches under vmap, called directly (see _apply)
    from torch._functorch.autograd_function import custom_function_call_vmap_helper
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

    _VMAP = torch._C._functorch.TransformType.Vmap
except (ImportError, AttributeError):  # another torch's internals: Function.apply everywhere
    custom_function_call_vmap_helper = None


def active() -> bool:
    """Whether a torch.func transform that the Functions below serve is running (never while torch.compile
    traces: it treats the ops as opaque custom ops with their registered fake and autograd kernels; nor
    under functionalize alone, which has no rule for autograd.Functions ("NYI: Functionalize rule for
    custom_function_call") and runs the registered ops as they are)."""
    return _transforms_running() and not _only_functionalize()


def functionalizing() -> bool:
    """Whether torch.func.functionalize is the one transform running: the public functions then call the
    functional ops only (functionalize refuses a custom op that writes into an argument, svgd_step_into)."""
    return _transforms_running() and _only_functionalize()


def _transforms_running() -> bool:
    return not torch.compiler.is_compiling() and _transforms_active()


def _only_functionalize() -> bool:
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        functionalize = torch._C._functorch.TransformType.Functionalize
        return all(i.key() == functionalize for i in retrieve_all_functorch_interpreters())
    except (ImportError, AttributeError):  # another torch's internals: the Functions, as before
        return False


def forward_ad_active() -> bool:
    """Whether a torch.autograd.forward_ad dual level is open (outside torch.func): rbf_kernel then goes
    through _RBFKernel, whose jvp gives K's tangent (torch's register_autograd rule has no forward
    derivative, and the compiled op alone gave dual inputs a K without one, so jacobians were 0)."""
    return forward_ad._current_level >= 0 and not torch.compiler.is_compiling()


def _only_outer_grad() -> bool:
    """Whether the one transform running is a single grad (or none runs, as in vjp's backward): then nothing
    differentiates or batches rbf_kernel's gradient again and the backend's backward kernel may compute it."""
    if not _transforms_active():
        return True
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        interpreters = retrieve_all_functorch_interpreters()
        return len(interpreters) == 1 and interpreters[0].key() == torch._C._functorch.TransformType.Grad
    except (ImportError, AttributeError):  # another torch's internals: the formula is right everywhere
        return False


def _apply(function: type[torch.autograd.Function], *args):
    """function.apply(*args). Where the innermost transform is a vmap, apply would reach torch's vmap helper
    with the Function's vmap rule; it is called directly, without apply's ~100 us of signature binding and
    operator dispatch (a vmapped svgd_step of 32 x 8 particles: 240 -> 137 us on a 2-core EPYC)."""
    if custom_function_call_vmap_helper is not None and _transforms_active():
        interpreter = retrieve_current_functorch_interpreter()
        if interpreter.key() == _VMAP:
            return custom_function_call_vmap_helper(interpreter, function.vmap, function, *args)
    return function.apply(*args)


def _base(t: torch.Tensor) -> torch.Tensor:
    """t without the wrappers of torch.func's levels (the tensor plain autograd sees)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t) or torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _slices(tensors: tuple, in_dims: tuple, index: int | None) -> list:
    """Batch entry `index` of each argument (unbatched ones as they are). A tensor passed twice gives one
    slice object twice, so the ops still see x on both sides (rbf_kernel(x, x): the self kernel).
    index None: a stand-in for an entry of an empty batch, ones of an entry's shape, dtype and device (no
    memory: one expanded element), on which the op validates its arguments and shows its results' shapes."""
    seen: dict[tuple[int, int], torch.Tensor] = {}
    args = []
    for t, dim in zip(tensors, in_dims):
        if dim is not None:
            key = (id(t), dim)
            if key not in seen:
                if index is None:
                    seen[key] = t.new_ones(()).expand(t.shape[:dim] + t.shape[dim + 1 :])
                else:
                    seen[key] = t.select(dim, index)
            t = seen[key]
        args.append(t)
    return args


def _each(info, in_dims: tuple, tensors: tuple, call: Callable) -> tuple[torch.Tensor, ...]:
    """call on each batch entry's slices (unbatched arguments as they are), results stacked along dim 0. An
    empty batch: call once on stand-ins (_slices), so bad arguments raise as for any batch, and empty
    results of its results' shapes and dtypes (vmap of torch's own ops gives those too)."""
    if info.batch_size == 0:
        result = call(*_slices(tensors, in_dims, None))
        return tuple(r.new_empty((0, *r.shape)) for r in (result if isinstance(result, tuple) else (result,)))
    results = []
    for index in range(info.batch_size):
        result = call(*_slices(tensors, in_dims, index))
        results.append(result if isinstance(result, tuple) else (result,))
    return tuple(torch.stack(column) for column in zip(*results))


class _NoGradient(torch.autograd.Function):
    """A Function whose output has no gradient (svgd_step, median_bandwidth), as outside transforms."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output)

    @staticmethod
    def backward(ctx, grad):  # (never called: the output is not differentiable)
        raise RuntimeError("this op is not differentiable")

    @staticmethod
    def jvp(ctx, *tangents):
        # no tangent, as torch.argmax has none: jvp / jacfwd / hessian of a function that uses the median
        # bandwidth or a step (a constant there, as under grad) had raised "You must implement the jvp"
        return None


class _SVGDStep(_NoGradient):
    @staticmethod
    def forward(x, score, bandwidth, backend, check_inputs, group):
        from . import ops

        return ops.svgd_step(x, score, bandwidth, backend=backend, check_inputs=check_inputs, group=group)

    @staticmethod
    def vmap(info, in_dims, x, score, bandwidth, backend, check_inputs, group):
        from . import backends, ops
        from ._validation import as_rows, check_bandwidth

        tensors, dims = (x, score, bandwidth), in_dims[:3]

        def one(x, score, bandwidth):
            return ops.svgd_step(x, score, bandwidth, backend=backend, check_inputs=check_inputs, group=group)

        if group is not None:  # (each set runs its own collectives: every rank must run as many)
            from . import distributed

            distributed.agree_on_batch(info.batch_size, group)

        # slices wrapped by outer transforms (no out= there), or an empty batch (_each's stand-ins)
        if active() or x.dim() < 2 or in_dims[0] is None or info.batch_size == 0:
            return _each(info, dims, tensors, one)[0], 0
        # each entry's phi written in place into one batch-first result (the backend's allocation: on the CPU
        # huge pages, reused), not stacked: stacking copies the batch and faults its fresh pages in (4 sets of
        # 16 x 76,800 fp32 on a 2-core EPYC: 3.6-4.3 ms, more than the 2.4 ms of the four steps). The first
        # entry is checked as a single call; the others' slices share its shape, dtype and device (the
        # batched tensors'), so each is left its bandwidth's check and the step (~3 us of Python less per
        # entry: a vmapped step of 16 sets of 32 x 8 particles 559 -> 505 us on a 2-core EPYC).
        batch_first = x.movedim(in_dims[0], 0)
        if group is not None:  # (each entry's collectives, its checks among them: a backend that one rank cannot
            # run is raised on every rank there; chosen here for the result's memory, it had been raised on that
            # rank alone, the others waiting in the step's collectives)
            phi = torch.empty(batch_first.shape, dtype=x.dtype, device=x.device)
            for index in range(info.batch_size):
                ops._svgd_step(*_slices(tensors, dims, index), backend, check_inputs, group, phi[index], fresh_out=True)
            return phi, 0
        first = _slices(tensors, dims, 0)
        h = ops._checked_bandwidth(*first, check_inputs)
        chosen = backends.select(backend, "svgd_step", as_rows(first[0]))
        phi = chosen.empty_result(batch_first)
        if chosen.steps_batches:  # all sets in one op (the compiled backends': no Python per set; CPU ~20 us less)
            scores = score.movedim(dims[1], 0) if dims[1] is not None else score.expand(info.batch_size, *score.shape)
            hs = None if h is None else _set_bandwidths(bandwidth, dims[2], h, info.batch_size, first[0], check_inputs)
            return ops._steps_on(chosen, batch_first, scores, hs, check_inputs, phi), 0
        for index in range(info.batch_size):
            if index:
                xs, scores, bandwidths = _slices(tensors, dims, index)
                h = check_bandwidth(bandwidths, xs, check_value=check_inputs)
            else:
                xs, scores = first[:2]
            ops._step_on(chosen, xs, scores, h, check_inputs, phi[index])
        return phi, 0


def _set_bandwidths(bandwidth, dim, h, sets: int, like: torch.Tensor, check_inputs: bool) -> torch.Tensor:
    """One bandwidth per set, (sets,) on like's device: h (the first set's, checked) for all where vmap does
    not batch the bandwidth (a float, or a tensor shared by every set); else the batched tensor's values, each
    checked as a single call would check it (its shape, dtype and device are the first set's)."""
    from ._validation import check_bandwidth

    if dim is None:
        return h.reshape(1).expand(sets)
    values = bandwidth.detach().movedim(dim, 0).reshape(sets).to(like.device)
    if check_inputs:
        bad = ~((values > 0) & torch.isfinite(values))
        if bool(bad.any()):
            check_bandwidth(values[int(bad.nonzero()[0])], like)  # the single call's error for the first bad one
    return values


def svgd_step(x, score, bandwidth, *, backend, check_inputs, group, out):
    if out is not None:
        raise ValueError(
            "out= is not supported inside torch.func transforms (vmap, grad, ...): call svgd_step without it"
        )
    return _apply(_SVGDStep, x, score, bandwidth, backend, check_inputs, group)


def _kernel_and_bandwidth(x, y, bandwidth, backend, check_inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, H used) of rbf_kernel: through _RBFKernel while a transform or forward AD runs, else the op as
    it is."""
    if active() or forward_ad_active():
        return _apply(_RBFKernel, x, y, bandwidth, backend, check_inputs)
    from . import ops

    return ops._rbf_kernel(x, y, bandwidth, backend, check_inputs)


class _RBFKernel(torch.autograd.Function):
    """(K, H) of rbf_kernel(x, y, bandwidth); H, the bandwidth used, is not differentiable (a tensor
    bandwidth's gradient comes through K)."""

    @staticmethod
    def forward(x, y, bandwidth, backend, check_inputs):
        from . import ops

        k, h = ops._rbf_kernel(x, y, bandwidth, backend, check_inputs)
        return k, h.detach().clone()  # (a fresh tensor: a given bandwidth is an input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, bandwidth, backend, check_inputs = inputs
        k, h = output
        ctx.mark_non_differentiable(h)
        ctx.backend = backend
        ctx.bandwidth_given = isinstance(bandwidth, torch.Tensor)
        # x on both sides (y None, or x passed twice): the self kernel, whose x gradient sums both sides'
        saved = (x, None if y is x else y, bandwidth if ctx.bandwidth_given else None, h, k)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def _bandwidth(ctx, bandwidth, h, x):
        """H for the formulas: a given tensor bandwidth as the input (its own derivatives), the median's
        H as a constant."""
        return bandwidth.reshape(()).to(x.device) if ctx.bandwidth_given else h

    @staticmethod
    def backward(ctx, grad, _grad_h):
        from . import backends
        from ._validation import as_rows

        x, y, bandwidth, h, k = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        x2, y2 = as_rows(x), None if y is None else as_rows(y)
        inputs = [t for t in (grad, x, y, bandwidth, k) if t is not None]
        if _only_outer_grad() and not (torch.is_grad_enabled() and any(_base(t).requires_grad for t in inputs)):
            # nothing differentiates this gradient again: the backend's backward kernel, no graph
            with torch.no_grad():
                chosen = backends.select_rbf_kernel(ctx.backend, x2, y2)
                grads = chosen.rbf_kernel_vjp(grad, x2, y2, h, k, needs)
        else:
            from . import reference

            grads = reference.rbf_kernel_vjp(grad, x2, y2, _RBFKernel._bandwidth(ctx, bandwidth, h, x), k, needs)
        grad_x, grad_y, grad_h = (g if need else None for g, need in zip(grads, needs))
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape)
        if grad_y is not None:
            grad_y = grad_y.reshape(y.shape)
        if grad_h is not None:
            grad_h = grad_h.reshape(bandwidth.shape).to(device=bandwidth.device, dtype=bandwidth.dtype)
        return grad_x, grad_y, grad_h, None, None

    @staticmethod
    def jvp(ctx, t_x, t_y, t_bandwidth, _t_backend, _t_check):
        from . import reference
        from ._validation import as_rows

        x, y, bandwidth, h, k = ctx.saved_tensors
        hb = _RBFKernel._bandwidth(ctx, bandwidth, h, x)
        tangents = (
            None if t_x is None else as_rows(t_x),
            None if t_y is None or y is None else as_rows(t_y),
            None if t_bandwidth is None or not ctx.bandwidth_given else t_bandwidth.reshape(()).to(x.device),
        )
        return reference.rbf_kernel_jvp(as_rows(x), None if y is None else as_rows(y), hb, k, tangents), None

    @staticmethod
    def vmap(info, in_dims, x, y, bandwidth, backend, check_inputs):
        def one(x, y, bandwidth):
            return _kernel_and_bandwidth(x, y, bandwidth, backend, check_inputs)

        return _each(info, in_dims[:3], (x, y, bandwidth), one), (0, 0)


def rbf_kernel(x, y, bandwidth, backend, check_inputs):
    return _kernel_and_bandwidth(x, y, bandwidth, backend, check_inputs)[0]


class _MedianBandwidth(_NoGradient):
    @staticmethod
    def forward(x, method, num_pairs, generator, backend, check_inputs):
        from . import ops

        return ops.median_bandwidth(
            x, method=method, num_pairs=num_pairs, generator=generator, backend=backend, check_inputs=check_inputs
        )

    @staticmethod
    def vmap(info, in_dims, x, method, num_pairs, generator, backend, check_inputs):
        from . import ops

        def one(x):
            return ops.median_bandwidth(
                x, method=method, num_pairs=num_pairs, generator=generator, backend=backend, check_inputs=check_inputs
            )

        entry = _slices((x,), in_dims[:1], 0 if info.batch_size else None)[0]
        if method == "sampled" and info.randomness == "error" and _draws_pairs(entry, num_pairs, backend):
            raise RuntimeError(
                'vmap: median_bandwidth(method="sampled") draws random pairs; pass randomness="different" (each '
                'batch entry its own pairs) or "same" (one set of pairs for all) to torch.vmap'
            )
        if method != "sampled" or info.randomness != "same" or not isinstance(generator, (torch.Generator, type(None))):
            return _each(info, in_dims[:1], (x,), one)[0], 0
        # "same": every entry draws the pairs the first one drew (the same random state before each)
        state = generator.get_state() if generator is not None else torch.random.get_rng_state()

        def same(x):
            if generator is not None:
                generator.set_state(state)
            else:
                torch.random.set_rng_state(state)
            return one(x)

        return _each(info, in_dims[:1], (x,), same)[0], 0


def _draws_pairs(x: torch.Tensor, num_pairs: object, backend: str) -> bool:
    """Whether median_bandwidth(x, method="sampled") samples pairs (a bad argument: no, the call names it)."""
    from . import backends, ops
    from ._validation import as_rows

    from ._validation import positive_count

    pairs = positive_count(num_pairs)
    if pairs is None or x.dim() < 1:
        return False
    return ops.draws_pairs(x.shape[0], pairs, backends.select(backend, "median_bandwidth", as_rows(x)))


def median_bandwidth(x, method, num_pairs, generator, backend, check_inputs):
    return _apply(_MedianBandwidth, x, method, num_pairs, generator, backend, check_inputs)
