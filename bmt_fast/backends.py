"""Backends behind the public ops and the `backend="auto"` choice.

Every backend takes 2-D inputs that the public functions have already validated:
    svgd_step(x (n, d), score (n, d), h: 0-dim tensor | None) -> phi (n, d)      None = median rule
    rbf_kernel(x (n, d), y (m, d) | None, h: 0-dim tensor) -> (n, m)            differentiable
    median_bandwidth(x (n, d)) -> 0-dim tensor                                   exact median rule
    rbf_kernel_median(x (n, d)) -> (K (n, n), H): rbf_kernel(x, None, H), H = median_bandwidth(x) a constant
    rbf_kernel_vjp(grad, x, y | None, h, k, needs) -> (grad_x, grad_y, grad_h)   rbf_kernel's backward
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import _extension, reference


class Backend:
    name = ""
    device_types: tuple[str, ...] = ()
    # median_bandwidth(method="sampled") returns the exact median while n * n <= this factor * num_pairs:
    # there the exact median costs less than the samples (1 = no more pairs than samples).
    exact_median_pair_factor = 1

    def unavailable_reason(self) -> str:
        """Empty when the backend can run; otherwise why not (shown by `python -m bmt_fast.info`)."""
        return ""

    def available(self) -> bool:
        return not self.unavailable_reason()

    def supports(self, device: torch.device) -> bool:
        return self.available() and device.type in self.device_types

    def svgd_step(self, x: torch.Tensor, score: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def rbf_kernel(self, x: torch.Tensor, y: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def median_bandwidth(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rbf_kernel_median(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rbf_kernel(x, None, H), H) with H = median_bandwidth(x) treated as a constant."""
        with torch.no_grad():
            h = self.median_bandwidth(x)
        return self.rbf_kernel(x, None, h), h

    def rbf_kernel_vjp(self, grad, x, y, h, k, needs) -> tuple:
        """(grad_x, grad_y, grad_h) of K = rbf_kernel(x, y, h) for dL/dK = grad (y None: the self kernel, x's
        gradient the sum of both sides'), each None or ignored where `needs` (three flags) is False. Here the
        differentiable pure-torch formula; the compiled backends call their backward kernels."""
        return reference.rbf_kernel_vjp(grad, x, y, h, k, needs)

    def empty_result(self, x: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous tensor like x for a result the public API allocates itself."""
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def svgd_step_into(
        self, x: torch.Tensor, score: torch.Tensor, h: torch.Tensor | None, out: torch.Tensor
    ) -> torch.Tensor | None:
        """svgd_step written into out (x's shape and dtype, contiguous); returns a 0-dim bool tensor on x's
        device, whether phi is all finite, where the kernel knows it without another pass over phi, or None
        where it does not (the caller scans). The flag is not read here: on a GPU that would synchronise."""
        out.copy_(self.svgd_step(x, score, h))
        return None

    # whether svgd_step_batched_into runs B sets in one call (torch.func.vmap of svgd_step); elsewhere the vmap
    # rule calls svgd_step_into once per set
    steps_batches = False

    def svgd_step_batched_into(self, x, score, h, out) -> torch.Tensor:
        """svgd_step_into of B particle sets (x, score, out: (B, n, d), out contiguous; h None, the median
        rule, or a (B,) tensor, one bandwidth per set); returns a (B,) bool tensor, whether each set's phi is
        all finite, as the kernels flag it. Only where steps_batches holds."""
        raise NotImplementedError

    def svgd_step_spreads_non_finite(self, x: torch.Tensor) -> bool:
        """True where a NaN/Inf anywhere in x or score is known to make phi non-finite and svgd_step_into's
        flag comes from the kernel itself: svgd_step may then check that flag (no pass over phi) instead of
        scanning both inputs (two passes), and scan the inputs only to name the bad one. Only for kernels
        that never skip a product with a zero weight (0 * NaN = NaN)."""
        return False


class TorchBackend(Backend):
    """The readable reference; runs anywhere torch runs."""

    name = "torch"
    device_types = ("cpu", "cuda", "mps", "xpu", "meta")

    def supports(self, device: torch.device) -> bool:
        return True

    def svgd_step(self, x, score, h):
        with reference.autocast_off(x):
            return reference.svgd_step(x, score, None if h is None else _nan_unless_valid(h)).to(x.dtype)

    def rbf_kernel(self, x, y, h):
        dtype = reference.accumulation_dtype(x.dtype)
        y = None if y is None else y.to(dtype)
        with reference.autocast_off(x):
            return reference.rbf_kernel(x.to(dtype), y, _nan_unless_valid(h).to(dtype)).to(x.dtype)

    def median_bandwidth(self, x):
        with reference.autocast_off(x):
            return reference.median_bandwidth(x)


def _nan_unless_valid(h: torch.Tensor) -> torch.Tensor:
    """H where 0 < H < inf, else NaN: a bandwidth passed unchecked (check_inputs=False) gives NaN, as in the
    CUDA and Triton kernels, instead of a result of the wrong sign or scale."""
    return torch.where((h > 0) & (h < math.inf), h, math.nan)


class CompiledBackend(Backend):
    """Kernels registered as torch.ops.bmt_fast.* by a compiled extension (C++ for CPU, CUDA for GPUs)."""

    def __init__(self, name: str, status: _extension.ExtensionStatus, device_type: str):
        self.name = name
        self.status = status
        self.device_types = (device_type,)
        # CUDA: up to how many particles the kernels themselves flag a non-finite phi (the extension's
        # build_info, read once here: it builds a dict; and torch.compile cannot trace the call)
        info = status.module.build_info() if status.loaded and name == "cuda" else {}
        self._flagged_particles = int(info.get("gram_register_rows", 0))
        # The CPU's exact median (one GEMM pass and a selection) against 65,536 gathered pairs on a 2-core
        # Xeon: exact faster at n = 2048 (d = 16: 6.3 against 7.7 ms; d = 256: 13 against 36 ms), sampled
        # faster at n = 3072 (d = 64: 8.3 against 14.7 ms). Not measured on a GPU: no more pairs there.
        self.exact_median_pair_factor = 64 if device_type == "cpu" else 1
        self.steps_batches = True

    def unavailable_reason(self) -> str:
        if not self.status.loaded:
            return self.status.reason
        if "cuda" in self.device_types:
            if not torch.cuda.is_available():
                return "no CUDA device (the CUDA extension is built; it runs where torch.cuda.is_available())"
            arch_list = self.status.build_info.get("arch_list")
            capability = torch.cuda.get_device_capability()
            if isinstance(arch_list, str) and cuda_arch_runs(capability, arch_list) is False:
                # (chosen by "auto", every op had failed with "no kernel image is available")
                version = "{}.{}".format(*capability)
                # (no device name: torch.cuda.get_device_name cannot be traced, and torch.compile traces this)
                return (
                    f"the CUDA extension holds code for compute capabilities {arch_list!r}, none of which runs on "
                    f"the current device (compute capability {version}): rebuild with "
                    f'BMT_FAST_CUDA_ARCH_LIST="{version}" (README, "Install")'
                )
        return ""


    def svgd_step(self, x, score, h):
        return torch.ops.bmt_fast.svgd_step(x, score, h)

    def empty_result(self, x):
        if self.name == "cpu":  # as the CPU ops' own results: huge pages, reused, when large
            return self.status.module.empty_large_like(x)
        return super().empty_result(x)

    def svgd_step_into(self, x, score, h, out):
        # Written in place. Where svgd_step_spreads_non_finite holds, the kernels track the flag as they
        # write phi; elsewhere the op copies phi in and scans it (the public API does not call it there).
        return torch.ops.bmt_fast.svgd_step_into(x, score, h, out=out)

    def svgd_step_batched_into(self, x, score, h, out):
        # One op for all sets. The CPU kernel spreads sets that the single op would run on one thread over
        # the threads, each set on one; on CUDA the op calls svgd_step_into for each set in C++ (no Python
        # and no host sync per set; not timed on a GPU).
        return torch.ops.bmt_fast.svgd_step_batched_into(x, score, h, out=out)

    def rbf_kernel(self, x, y, h):
        return torch.ops.bmt_fast.rbf_kernel(x, x if y is None else y, h)

    def median_bandwidth(self, x):
        return torch.ops.bmt_fast.median_bandwidth(x)

    def rbf_kernel_median(self, x):
        # one op: on the CPU with few particles, one pass over x gives both the median and the kernel
        return torch.ops.bmt_fast.rbf_kernel_median(x)

    def rbf_kernel_vjp(self, grad, x, y, h, k, needs):
        return compiled_rbf_kernel_vjp(grad, x, y, h, k, needs)

    def svgd_step_spreads_non_finite(self, x):
        # CPU, every path: a bad x value makes its column's centring shift (a mean) non-finite, so that column
        # of every centred row, every squared distance (norms and dot products: Inf - Inf or NaN) and every
        # weight K_ij NaN, which every product then carries into every phi row (NaN weights are not zeros, so
        # no BLAS skips them); with the median rule H is NaN too, and so is all of phi; the caller answers a
        # cleared flag by naming the input. A bad score value reaches its own phi row through the own term score_i,
        # which every CPU kernel adds as it is, outside any product (and every row through K W where the
        # kernels' own loops multiply it, zero weights included: 0 * NaN = NaN). svgd_step_into's flag comes
        # from the last pass that writes phi (the Gram, AMX, feature-chunk, fused and fp32 GEMM-tile paths) or
        # from one scan of phi in the op (fp64 GEMM tiles, 16-bit particles off AMX): one pass over phi at
        # most, instead of one over x and one over score.
        # CUDA, the register kernels (n <= gram_register_rows): a bad x value makes its row's shifted value, or
        # (in x_0) every row's, non-finite there, which the apply kernel multiplies into phi; a bad score
        # reaches every phi row through its FMAs. (cuBLAS and the tiled kernels: not assumed; the op scans the
        # inputs there.)
        if not self.status.loaded or x.device.type != self.device_types[0]:
            return False
        return self.name == "cpu" or x.shape[0] <= self._flagged_particles


def cuda_arch_runs(capability: tuple[int, int], arch_list: str) -> bool | None:
    """Whether a build for `arch_list` (TORCH_CUDA_ARCH_LIST's form, e.g. "8.0;9.0+PTX") has code a device of
    compute `capability` runs: machine code for the same major and a minor at most the device's ("8.0" runs
    on 8.6; an arch-specific "9.0a" on 9.0 only), or PTX ("+PTX") for a capability at most the device's.
    None where an entry is not of that form (a named architecture): not known."""
    device = tuple(capability)
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not entry:
            continue
        base, ptx = (entry[: -len("+PTX")], True) if entry.upper().endswith("+PTX") else (entry, False)
        specific = base.endswith("a")  # (a family build, "10.0f", runs as plain machine code does)
        major, dot, minor = base.rstrip("af").partition(".")
        if not (dot and major.isdigit() and minor.isdigit()):
            return None
        built = (int(major), int(minor))
        if device == built or (not specific and built[0] == device[0] and built[1] <= device[1]):
            return True
        if ptx and not specific and built <= device:
            return True
    return False


def vjp_by_ops(self_backward, backward, grad, x, y, h, k, needs, *extra) -> tuple:
    """Backend.rbf_kernel_vjp by a backend's two backward ops (no autograd graph), `extra` their trailing
    arguments: only the gradients `needs` asks for are computed, the others come back as None or zeros (for
    the trainer's prior, one prompt against constant particles and a constant H, that is grad_x alone)."""
    if y is None and needs[0]:
        # the self kernel: autograd would add x's two row gradients; this op gives their sum (on the CPU in one
        # pass with the weights grad + grad^T formed a block at a time: K is symmetric; Triton: one
        # symmetrised pass; CUDA: the rule of csrc/registration.cpp, rbf_kernel_self_backward_composite)
        grad_x, grad_h = self_backward(grad, x, k, h, [True, needs[2]], *extra)
        return grad_x, None, grad_h
    return backward(grad, x, x if y is None else y, k, h, list(needs), *extra)


def compiled_rbf_kernel_vjp(grad, x, y, h, k, needs) -> tuple:
    """vjp_by_ops with the compiled backward ops of torch.ops.bmt_fast (CPU and CUDA)."""
    ops = torch.ops.bmt_fast
    return vjp_by_ops(ops.rbf_kernel_self_backward, ops.rbf_kernel_backward, grad, x, y, h, k, needs)


_REGISTRY: dict[str, Backend] = {}
# select()'s memo: (name, op, device type, n, d, dtype) -> backend
_SELECTED: dict[tuple, Backend] = {}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend
    _SELECTED.clear()


register(TorchBackend())
register(CompiledBackend("cpu", _extension.CPU, "cpu"))
register(CompiledBackend("cuda", _extension.CUDA, "cuda"))

# Per device type: a function (op, n, d, dtype) -> backend names in order of preference for backend="auto".
# The orders rest on benchmarks/results; GPU backends add their own rule when they register.
AutoRule = Callable[[str, int, int, torch.dtype], list[str]]
_AUTO_RULES: dict[str, AutoRule] = {"cpu": lambda op, n, d, dtype: ["cpu", "torch"]}


def set_auto_rule(device_type: str, rule: AutoRule) -> None:
    _AUTO_RULES[device_type] = rule
    _SELECTED.clear()


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose from 'auto', {', '.join(map(repr, _REGISTRY))}")
    return _REGISTRY[name]


def available_backends() -> list[str]:
    """Names of the backends that can run in this process (whatever the device)."""
    return [name for name, backend in _REGISTRY.items() if backend.available()]


def unavailable_backends() -> dict[str, str]:
    """Backends that cannot run here, with the reason."""
    return {name: b.unavailable_reason() for name, b in _REGISTRY.items() if not b.available()}


def select(backend: str, op: str, x: torch.Tensor) -> Backend:
    """The backend that runs `op` on x (n, d): an explicit name is checked, "auto" picks by rule.

    The choice depends only on the name, the op, x's device type, n, d and dtype, and backends do not come
    or go while a process runs (registering one or a rule clears the memo): it is looked up once per
    combination, not on every step (a few microseconds of Python per call otherwise)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    n, d = x.shape[0], x.shape[1] if x.dim() == 2 else math.prod(x.shape[1:])
    if type(n) is not int or type(d) is not int or torch.compiler.is_compiling():
        # Traced (torch.compile, torch.export), sizes may be symbolic: the memo, keyed on them, specialised
        # the graph to each size (torch.compile(dynamic=True) compiled again for every n) or failed (export:
        # a SymInt is unhashable). The rule itself guards only on what it compares (on CUDA, n and d against
        # the thresholds where Triton goes first; on the CPU nothing).
        return _select(backend, op, x.device.type, n, d, x.dtype)
    key = (backend, op, x.device.type, n, d, x.dtype)
    chosen = _SELECTED.get(key)
    if chosen is None:
        chosen = _select(*key)
        if len(_SELECTED) >= 4096:  # many distinct shapes: start over rather than grow without bound
            _SELECTED.clear()
        _SELECTED[key] = chosen
    return chosen


def select_rbf_kernel(backend: str, x: torch.Tensor, y: torch.Tensor | None) -> Backend:
    """select for rbf_kernel(x, y) (rows (n, d) and (m, d)): by the larger of the two, so that a rule's limits
    on n (the Triton kernels' 32-bit offsets: n * n, n * d below 2^31) hold for K's n * m and y's m * d too (by
    x alone `auto` had picked Triton for a K it refuses, e.g. 32,768 x 65,537)."""
    return select(backend, "rbf_kernel", x if y is None or y.shape[0] <= x.shape[0] else y)


def _select(backend: str, op: str, device_type: str, n: int, d: int, dtype: torch.dtype) -> Backend:
    device = torch.device(device_type)
    if backend != "auto":
        chosen = get(backend)
        reason = chosen.unavailable_reason()
        if reason:
            raise RuntimeError(f"backend {backend!r} is not available: {reason}")
        if not chosen.supports(device):
            raise ValueError(f"backend {backend!r} does not run on {device_type} tensors")
        return chosen
    rule = _AUTO_RULES.get(device_type, lambda op, n, d, dtype: [])
    for name in rule(op, n, d, dtype):
        if name in _REGISTRY and _REGISTRY[name].supports(device):
            return _REGISTRY[name]
    return _REGISTRY["torch"]
