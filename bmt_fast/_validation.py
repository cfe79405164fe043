"""Input checks shared by the public functions: a clear error naming the argument, never a wrong answer."""

from __future__ import annotations

import functools
import math
import numbers
import operator

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .reference import accumulation_dtype

FLOATING_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_particles(name: str, t: object, *, min_rows: int = 1) -> torch.Tensor:
    """A dense floating tensor of shape (n, *event) with n >= min_rows and at least one element."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_dense(name, t)
    if t.dtype not in FLOATING_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have shape (n, *event), got a 0-dim tensor")
    if t.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} particle(s), got shape {tuple(t.shape)}")
    if t.numel() == 0 and math.prod(t.shape[1:]) == 0:  # no rows: only where min_rows=0; an empty event: never
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    return t


def check_dense(name: str, t: torch.Tensor) -> None:
    """A strided (dense) tensor: the kernels read rows of memory (a sparse one had failed inside with
    "out must be contiguous" or a dispatcher error)."""
    if t.is_nested:  # (strided: "NestedTensorImpl doesn't support sizes"; jagged: to_dense() does not take it)
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor: pass {name}.to_padded_tensor(...)")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}: pass {name}.to_dense()")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in t, in one reduction pass: a NaN or an Inf never sums to a finite value, so a finite
    sum proves it. Only a non-finite sum (which large finite values can also give, by overflow) takes the
    element-wise check. (`isfinite(t).all()` alone costs several passes and a bool tensor of t's size:
    at n=16, d=409,600 on a 2-core CPU the two checks took ~12 ms, about 5x the SVGD step they guarded.)
    bf16 is summed in its own dtype (fp32's exponent range, fp32 accumulation); fp16, whose sums overflow
    at 65504, by its extremes (NaN propagates into them, an Inf is one): `t.sum(dtype=torch.float32)`, as
    this was, makes an fp32 copy of t on the CPU first (256 x 76,800 on a 2-core Xeon: 22 ms against
    0.8 ms for the bf16 sum and 1.7 ms for the fp16 extremes)."""
    if t.numel() == 0 or not readable(t):  # no values to scan (fake ones and make_fx's tracing: FakeTensorMode,
        return True  # make_fx and linearize had failed on .item())
    t = t.detach()  # (no autograd record; cheaper than entering no_grad)
    if t.dtype == torch.float16:
        lowest, highest = torch.aminmax(t)
        return math.isfinite(lowest.item()) and math.isfinite(highest.item())
    if math.isfinite(t.sum().item()):  # (the sum read as a Python float: a few microseconds less per call
        return True  # than isfinite and bool on tensors, 100 x 50 fp32 on a 2-core Xeon 8.9 -> 3.1 us)
    return bool(torch.isfinite(t).all())


def non_finite_count(t: torch.Tensor) -> int:
    """How many NaN/Inf values t holds: about one pass (all_finite) where there are none."""
    return 0 if all_finite(t) else int((~torch.isfinite(t.detach())).sum())


def check_finite(name: str, t: torch.Tensor) -> None:
    """NaN/Inf check (about one pass over t; callers may opt out for speed)."""
    bad = non_finite_count(t)
    if bad:
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s)")


def fold_overflow_error(h: float, dtype: torch.dtype) -> ValueError:
    """The error for a given bandwidth so small that the folded form's (2/H) * x passes the accumulation
    dtype's range (its Inf times a k_ij of 0 is NaN): the check of H alone (1/H finite) cannot see x."""
    compute = accumulation_dtype(dtype)
    return ValueError(
        f"bandwidth {h:g} is too small for these {dtype} particles: (2/H) times their distances from the centre, "
        f"summed over the particles, overflows {compute} in the kernels' folded sums (at such an H only "
        f"duplicated particles still interact): pass a larger bandwidth"
    )


def fold_overflows(x: torch.Tensor, h: float) -> bool:
    """Whether the folded sums sum_j k_ij (2/H)(x_j - c), up to n terms of (2/H)|x_j - c| each (k_ij = 1 for
    duplicated particles), can pass the accumulation dtype's largest value for the centre c the kernels use
    (the mean, or a particle: |x_j - x_0| <= 2 max |x - mean|), while the squared distances themselves do not
    (those overflow at any H: the particles are too large, not H too small). Called only where phi came out
    non-finite from finite inputs and a given H, to tell this from an overflow of phi itself."""
    largest = torch.finfo(accumulation_dtype(x.dtype)).max
    xc = x.detach().to(torch.float64)
    spread = float((xc - xc.mean(0)).abs().max())
    distances_fit = (2.0 * spread) ** 2 * x.shape[1] <= largest
    return distances_fit and (2.0 / h) * 2.0 * spread * x.shape[0] > largest


def fold_may_overflow(x: torch.Tensor, h: float) -> bool:
    """fold_overflows' necessary condition from x's shape and dtype alone (no pass over x): its bound with the
    largest spread whose distances still fit. False for any H a call would normally give (fp32, 300 x 128:
    H below 6e-18)."""
    largest = torch.finfo(accumulation_dtype(x.dtype)).max
    spread = math.sqrt(largest / max(x.shape[1], 1)) / 2.0
    return (2.0 / h) * 2.0 * spread * x.shape[0] > largest


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, shape: bool = True) -> None:
    """Same dtype and device (and shape unless shape=False) for two tensors that go into one op."""
    if shape and a.shape != b.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} must have the dtype of {name_a} ({a.dtype}), got {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_b} must be on the device of {name_a} ({a.device}), got {b.device}")


def check_out(out: torch.Tensor, x: torch.Tensor, score: torch.Tensor) -> None:
    """An out= tensor for phi: x's shape, dtype and device, contiguous, and no memory shared with the inputs
    (phi is written while x and score are still read)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    check_dense("out", out)
    check_same("x", x, "out", out)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if out.requires_grad and torch.is_grad_enabled():  # as torch's out= functions: phi has no autograd history
        raise ValueError("out must not require grad (svgd_step is not differentiable); pass a tensor autograd does "
                         "not track, or call it under torch.no_grad()")
    # no memory to compare: meta tensors, and fake ones (traced by torch.compile: dynamo does not trace
    # is_fake, so it is asked only outside dynamo, e.g. by opcheck)
    # nor functionalize's wrappers, whose step is out of place and then copied into out (no overlap to fear)
    if out.device.type == "meta" or torch.compiler.is_compiling() or _maybe_fake(out) or _is_functional(out):
        return
    for name, t in (("x", x), ("score", score)):
        if overlaps(out, t):
            raise ValueError(f"out must not share memory with {name}")


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte spans of a's and b's elements meet (_byte_span: conservative for strided views)."""
    span_a, span_b = _byte_span(a), _byte_span(b)
    return bool(span_a and span_b and span_a[0] < span_b[1] and span_b[0] < span_a[1])


def bandwidth_in(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """H for arithmetic in `dtype`, NaN unless positive and finite both as given and in `dtype`: a valid H past
    dtype's range is dtype's largest value (a cast's +inf had been taken for an invalid H: a float64 1e39 for
    fp32 work), one that is 0 in `dtype` stays invalid. A clamp to [the least positive value, the largest
    finite one] leaves exactly the valid values unchanged (NaN never equals itself): three launches, two more
    where h's dtype has the wider range."""
    info, own = torch.finfo(dtype), torch.finfo(h.dtype)
    if own.max > info.max:
        h = torch.where(h.clamp(own.smallest_normal * own.eps, own.max) == h, h.clamp_max(info.max), math.nan)
    h = h.to(dtype)
    return torch.where(h.clamp(info.smallest_normal * info.eps, info.max) == h, h, math.nan)


def _is_functional(t: torch.Tensor) -> bool:
    return torch._C._functorch.is_functionaltensor(t)


def readable(t: torch.Tensor) -> bool:
    """Whether t's values can be read eagerly: not a meta or fake tensor, nor one make_fx is tracing."""
    return t.device.type != "meta" and not _maybe_fake(t) and not _tracing()


def _tracing() -> bool:
    """Whether make_fx is tracing (also for torch.func.linearize): the values are not to be read, as .item()
    of a traced tensor raises there."""
    return _PROXY_MODE is not None and torch._C._get_dispatch_mode(_PROXY_MODE) is not None


_PROXY_MODE = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "PROXY", None)


def _maybe_fake(t: torch.Tensor) -> bool:
    """torch's is_fake(t), answered at once for a plain tensor (the usual out=): is_fake's chain of subclass
    checks cost ~1 us a call, a fifth of a small step's Python time. A plain tensor is fake only as a
    functionalization wrapper around a fake one, which is_fake then unwraps."""
    if type(t) is torch.Tensor and not torch._is_functional_tensor(t):
        return False
    return is_fake(t)


def _byte_span(t: torch.Tensor) -> tuple[int, int] | None:
    """[first byte, past the last byte) that t's elements can occupy (None for no elements). Views of one buffer
    whose spans are apart may be out and an input, as the compiled op's own overlap check allows; spans that
    meet are refused even where a stride leaves gaps (conservative)."""
    numel = t.numel()
    if numel == 0:
        return None
    start = t.data_ptr()
    if t.is_contiguous():  # (the sum below is numel - 1 then, without a Python loop over the dims)
        return start, start + numel * t.element_size()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(n, *event) -> (n, d) without copying when the layout allows it (n may be 0); 2-D t as it is."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], math.prod(t.shape[1:]))


def check_bandwidth(bandwidth: object, like: torch.Tensor, *, check_value: bool = True) -> torch.Tensor | None:
    """Normalise `bandwidth` to None ("median") or a positive finite 0-dim tensor on like's device.

    A float becomes a float64 tensor; a tensor keeps its dtype and autograd history (rbf_kernel can
    differentiate through it). Its value must be at least the smallest normal number of the kernels'
    arithmetic (float32, float64 for float64 particles), where 1/H stays finite. check_value=False skips
    reading a tensor's value (a device sync, and a data-dependent branch under torch.compile). The CPU
    kernels still reject a non-positive or too small bandwidth;
    the CUDA and Triton kernels do not read it on the host (no sync), so there an invalid H gives NaN, as
    it does in the pure-torch backend.
    """
    if isinstance(bandwidth, str):
        if bandwidth != "median":
            raise ValueError(f'bandwidth must be "median", a positive float or a 0-dim tensor, got {bandwidth!r}')
        return None
    if isinstance(bandwidth, torch.Tensor):
        if bandwidth.numel() != 1:
            raise ValueError(f"bandwidth tensor must hold one value, got shape {tuple(bandwidth.shape)}")
        if not bandwidth.is_floating_point():
            raise TypeError(f"bandwidth tensor must be floating point, got {bandwidth.dtype}")
        h = bandwidth.reshape(()).to(like.device)
        if not check_value or not readable(bandwidth):  # (no value to read: .item() had raised under make_fx /
            return h  # linearize tracing and on fake tensors)
        value = float(bandwidth.detach())
    elif isinstance(bandwidth, numbers.Real) and not isinstance(bandwidth, bool):
        if not check_value and torch.compiler.is_compiling():
            # traced: a float argument that changes between calls is symbolic there, and its checks below (math on
            # its value) had broken the graph, failing fullgraph=True at the second value; the graph's own tensor
            # (the CPU kernels still refuse a bad H, as for an unchecked tensor H)
            return torch.scalar_tensor(bandwidth, dtype=torch.float64, device=like.device)
        try:
            value = float(bandwidth)
        except OverflowError:  # e.g. 10**400: beyond any float
            raise ValueError(f"bandwidth must be positive and finite, got {type(bandwidth).__name__} beyond the float range") from None
        h = None
    else:
        raise TypeError(f'bandwidth must be "median", a positive float or a 0-dim tensor, got {type(bandwidth).__name__}')
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"bandwidth must be positive and finite, got {value}")
    compute = accumulation_dtype(like.dtype)
    if value < torch.finfo(compute).tiny:
        # 1/H and 2/H overflow there: K's own terms and phi became NaN (the step's answer is score / n)
        raise ValueError(
            f"bandwidth {value:g} is below the smallest normal {compute} number ({torch.finfo(compute).tiny:g}), "
            f"the arithmetic of {like.dtype} particles: 1/H would overflow"
        )
    if h is not None:
        return h
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode() or _functorch_transforms_active():
        # a constant of the graph (dynamo traces neither the cache nor the mode); under a dispatch mode
        # (FakeTensorMode, make_fx, a user's mode) the tensor made is the mode's: cached, it was handed to
        # every later plain call with that value (a FakeTensor there: "convert all Tensors to FakeTensors");
        # under torch.func.functionalize a functional wrapper, which later plain calls had been given (an
        # error in svgd_step, a result without storage from rbf_kernel)
        return torch.tensor(value, dtype=torch.float64, device=like.device)
    return _bandwidth_tensor(value, like.device, torch.is_inference_mode_enabled())


_functorch_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


@functools.lru_cache(maxsize=64)
def _bandwidth_tensor(value: float, device: torch.device, inference: bool) -> torch.Tensor:
    """A float bandwidth as a float64 0-dim tensor, made once per value and device (making one costs a few
    microseconds per call; an optimizer passes the same H every step). The ops only read it. One made in
    inference mode is an inference tensor, which autograd cannot save (rbf_kernel saves H for its
    backward): those are cached apart (`inference`)."""
    return torch.tensor(value, dtype=torch.float64, device=device)


def positive_count(value: object) -> int | None:
    """value as a positive int (a Python or numpy integer, anything with __index__; not a bool: numpy's
    refuses __index__ itself), else None."""
    if isinstance(value, bool):
        return None
    try:
        count = operator.index(value)
    except TypeError:
        return None
    return count if count >= 1 else None


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value  # type: ignore[return-value]
