"""Host-side helpers shared by the Triton launchers: interpreter detection, dtypes, the dot precision rule,
block sizes, input checks and one launch path for fixed and autotuned kernels."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton
import triton.language as tl

from bmt_fast._validation import bandwidth_in
from bmt_fast.triton_backend import TRITON_MAX_ELEMENTS

# Read once, when the kernels are defined: @triton.jit decides at decoration time whether a kernel is
# compiled for a GPU or run by the interpreter, so a later change of TRITON_INTERPRET has no effect.
INTERPRETING = bool(triton.knobs.runtime.interpret)
# Smallest block along d: tl.dot needs 16; the interpreter is slow per program (it runs them one by one in
# Python), so 64 there.
MIN_BLOCK = 64 if INTERPRETING else 16

# How tl.dot treats its operands (see kernels/tiles.py: dot_operand, dot_acc).
DOT_IEEE = 0  # exact fp32 (or fp64) products, fp32 (fp64) accumulation
DOT_TF32 = 1  # fp32 operands rounded to TF32 (10 mantissa bits), fp32 accumulation
DOT_HALF = 2  # operands rounded to bf16, fp32 accumulation
DOT_HALF_SPLIT = 3  # operands split into two bf16 parts, four bf16 products: ~fp32 accuracy

_HALF_TYPES = (torch.bfloat16, torch.float16)
_TL_DTYPES = {
    torch.float32: triton.language.float32,
    torch.float64: triton.language.float64,
    torch.bfloat16: triton.language.bfloat16,
    torch.float16: triton.language.float16,
}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 computes in fp64; fp32, bf16 and fp16 compute in fp32 (as bmt_fast.reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def dot_mode(dtype: torch.dtype, allow_tf32: bool | None) -> int:
    """The precision of the tensor-core products for inputs of `dtype`.

    allow_tf32=None (default): fp32 inputs follow torch's fp32 matmul precision, as torch's own GEMMs do:
        exact fp32 products under "highest" (torch's default), TF32 under "high" or "medium"
        (torch.set_float32_matmul_precision). bf16 inputs use one bf16 product (the centred rows rounded
        to bf16, fp32 accumulation), as torch's own bf16 matmuls and the CUDA and CPU backends' bf16
        kernels do: on an H200 2.7x faster than three products at n = 65536, d = 128 (README). fp16
        inputs use four products of their hi/lo bf16 parts, (hi + lo)(hi' + lo') (fp32 accuracy on the
        tensor cores): one bf16 product would round them to fewer bits than their own 11.
    allow_tf32=True: the caller accepts reduced precision: TF32 for fp32 inputs, one bf16 product for
        bf16/fp16 inputs (operands rounded to bf16 after centring).
    allow_tf32=False: exact fp32 products for every input dtype (no tensor cores; slowest on a GPU).
    float64 always multiplies in float64. Errors measured: benchmarks/results/triton_precision_*.csv.
    """
    if dtype == torch.float64 or allow_tf32 is False:
        return DOT_IEEE
    if dtype in _HALF_TYPES:
        return DOT_HALF if allow_tf32 or dtype == torch.bfloat16 else DOT_HALF_SPLIT
    if allow_tf32 is None:
        allow_tf32 = torch.get_float32_matmul_precision() != "highest"
    return DOT_TF32 if allow_tf32 else DOT_IEEE


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of non-negative ints, for the launchers. (triton.cdiv is a constexpr_function in Triton
    3.x, callable from kernels and the host alike: ~1.4 us a host call, which a prompt-regime step made 16
    times, against tens of ns here; kernels use tl.cdiv.)"""
    return -(-a // b)


def next_power_of_2(value: int, *, low: int, high: int) -> int:
    """The least power of two >= value, clamped to [low, high] (powers of two both); plain Python, as cdiv."""
    return max(low, min(high, 1 << (max(int(value), 1) - 1).bit_length()))


def num_programs_target(device: torch.device) -> int:
    """How many programs keep the device busy: a few per SM on a GPU, one in the interpreter (it runs
    programs one after another, so splitting work only costs time there)."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def check_device(t: torch.Tensor) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and INTERPRETING):
        return
    hint = "" if t.device.type != "cpu" else " (or set TRITON_INTERPRET=1 before importing bmt_fast to run them on the CPU)"
    raise ValueError(f"the Triton kernels run on CUDA tensors{hint}; got a {t.device.type} tensor")


# The kernels' offsets into a tensor are 32-bit (Triton's program ids, aranges and integer arguments below
# 2^31 are i32, and row * stride stays i32): a tensor of 2^31 elements or more would wrap them (a store
# before the buffer on a GPU). Such sizes are refused; backend "cuda" indexes in 64 bits. (One constant with
# the "auto" rule's, which skips Triton there.)
MAX_ELEMENTS = TRITON_MAX_ELEMENTS
# CUDA's limit on grid axes 1 and 2, where the launchers put the column chunks (axis 0 takes 2^31 - 1).
MAX_GRID_YZ = 65535


def check_elements(name: str, count: int) -> None:
    if count > MAX_ELEMENTS:
        raise ValueError(
            f"{name} has {count:,} elements: the Triton kernels index with 32-bit offsets (at most 2^31 - 1 "
            "elements a tensor); use backend='cuda'"
        )


def check_grid_axis(what: str, programs: int) -> None:
    """programs on grid axis 1 or 2 within CUDA's limit (a launch past it fails with "invalid argument")."""
    if programs > MAX_GRID_YZ:
        raise ValueError(
            f"{what} needs {programs:,} programs on a grid axis of at most {MAX_GRID_YZ:,} in the Triton kernels; "
            "use backend='cuda'"
        )


def check_rows(name: str, t: torch.Tensor) -> None:
    """A non-empty 2-D floating tensor (n, d), as the ops take it, with fewer than 2^31 elements."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D tensor (n, d), got shape {tuple(t.shape)}")
    if t.dtype not in _TL_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    check_elements(name, t.numel())


def check_like(ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def check_bandwidth(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A one-element floating tensor on x's device, as a (1,) view, for the kernels: they read it through
    tiles.load_bandwidth, which converts it to x's accumulation dtype and makes a value that is not positive
    and finite there NaN, so they give NaN, as the CUDA ones do. No launch of its own and no host sync (in
    the prompt regime a whole GPU step is a few launches; this was three of them, a cast more where H's
    dtype differed: a median-rule H is float64). (A device-side assert would end the process's CUDA
    context.) The public functions read and check a given bandwidth unless check_inputs=False.
    """
    if not isinstance(h, torch.Tensor) or h.numel() != 1 or not h.is_floating_point():
        raise ValueError(f"bandwidth must be a floating tensor with one value, got {h!r}")
    if h.device != x.device:
        raise ValueError(f"bandwidth must be on the device of x ({x.device}), got {h.device}")
    return h.detach().reshape(1)


def valid_bandwidth(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """check_bandwidth's H as load_bandwidth reads it, for arithmetic with H in torch: a (1,) tensor in x's
    accumulation dtype, NaN unless positive and finite there."""
    return bandwidth_in(check_bandwidth(h, x), accumulation_dtype(x.dtype))


def ensure_contiguous(fn: Callable) -> Callable:
    """Make every tensor argument contiguous (the kernels take row strides only)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return fn(*args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class TileConfig:
    """Rows x columns of the on-chip tile, and the launch options; the autotuner's search space on a GPU."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}

    def triton_config(self) -> triton.Config:
        return triton.Config(self.meta(), num_warps=self.num_warps, num_stages=self.num_stages)


# Interpreter and default launches: blocks of 64 (the interpreter is slow per program, and tl.dot needs
# at least 16). GPU candidates for the autotuner: square and skewed tiles, 4 or 8 warps.
FIXED_TILE = TileConfig()
# Autotuning candidates ahead of GPU_TILES where few rows are common (the prompt regime's 1-16 particles):
# in a 64-row tile 16 rows leave 3/4 of every product to padding.
SMALL_TILES = [TileConfig(16, 16, 4, 2), TileConfig(32, 32, 4, 2)]
GPU_TILES = [
    TileConfig(64, 64, 4, 2),
    TileConfig(64, 64, 4, 3),
    TileConfig(128, 64, 8, 2),
    TileConfig(64, 128, 8, 2),
    TileConfig(128, 128, 8, 2),
]


@dataclass
class Kernel:
    """A @triton.jit kernel with its autotuned twin (None in the interpreter, where autotuning several
    configs needs a driver, and for kernels whose side effects forbid re-running them)."""

    raw: object
    tuner: object = None
    fixed: TileConfig = field(default_factory=TileConfig)

    def launch(self, grid: Callable[[dict], tuple], *, tile: TileConfig | None = None, **kwargs) -> None:
        """grid(meta) -> launch grid. tile forces a config (tests); otherwise autotuned on a GPU."""
        if self.tuner is not None and tile is None:
            self.tuner[grid](**kwargs)
            return
        tile = tile or self.fixed
        meta = tile.meta()
        self.raw[grid({**kwargs, **meta})](**kwargs, **meta, num_warps=tile.num_warps, num_stages=tile.num_stages)


def specialisation_keys(raw) -> list[str]:
    """The kernel's compile-time parameters other than the tile: each value is another kernel, whose best
    tile (and whether a tile fits in shared memory at all) may differ."""
    fn = getattr(raw, "fn", raw)  # the Python function behind a JITFunction or the interpreter's wrapper
    names = [name for name, param in inspect.signature(fn).parameters.items()
             if param.annotation is tl.constexpr or param.annotation in ("tl.constexpr", "triton.language.constexpr")]  # fmt: skip
    return [name for name in names if name not in ("BLOCK_M", "BLOCK_N")]


def tunable(raw, *, key: list[str], tiles: list[TileConfig] = GPU_TILES, autotune: bool = True) -> Kernel:
    """Wrap a jit kernel whose BLOCK_M / BLOCK_N come from a TileConfig; autotuned on a GPU by `key` and its
    compile-time parameters (Triton adds the tensor dtypes): each specialisation is a different kernel with
    its own best tile (on an H200 the Gram path of svgd_step reused the tile tuned for the tiled path of
    the same n, d)."""
    if INTERPRETING or not autotune:
        return Kernel(raw)
    keys = list(key) + [k for k in specialisation_keys(raw) if k not in key]
    return Kernel(raw, triton.autotune(configs=[t.triton_config() for t in tiles], key=keys)(raw))
