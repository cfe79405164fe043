"""Helpers shared by the tests: tolerances measured against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import bmt_fast
from benchmarks.providers import float32_matmul_precision  # noqa: F401 (shared with the tests)

CPU_BACKENDS = [name for name in ("torch", "cpu") if name in bmt_fast.available_backends()]
COMPILED_CPU = "cpu" in bmt_fast.available_backends()

requires_cpu_extension = pytest.mark.skipif(not COMPILED_CPU, reason="bmt_fast._C not built")


def _cpu_bf16_amx() -> bool:
    from bmt_fast import _extension

    return COMPILED_CPU and bool(_extension.CPU.module.build_info().get("cpu_bf16_amx", False))


# bf16 with many particles runs on AMX tiles on this CPU (csrc/cpu/amx.cpp); BMT_FAST_CPU_AMX=0 turns it off
CPU_BF16_AMX = _cpu_bf16_amx()
requires_amx = pytest.mark.skipif(not CPU_BF16_AMX, reason="this CPU has no AMX bf16 tiles (or BMT_FAST_CPU_AMX=0)")


def amx_shift(rows: torch.Tensor) -> torch.Tensor:
    """The AMX path's shift of the particles for their distances (csrc/cpu/amx.cpp, amx_shift), (1, d) fp32:
    the mean of the rows (a float64 sum, rounded to fp32) for fp32 particles; for bf16 ones, per column, the
    mean on the grid of the column's coarsest bf16 ulp where every x - shift is then exact in bf16 (all of one
    sign and beyond shift / 2), else 0 (their rounded operands are the particles themselves, shifted), each
    only within sqrt(15) standard deviations of the mean and with every |x - shift|^2 d within 2^120; else
    the mean (exact_bf16_shift)."""
    mean = rows.double().mean(0, keepdim=True)
    if rows.dtype != torch.bfloat16:
        return mean.float()
    var = (rows.double() - mean).square().mean(0, keepdim=True)
    lo, hi = rows.double().amin(0, keepdim=True), rows.double().amax(0, keepdim=True)
    big = torch.maximum(lo.abs(), hi.abs())
    _, exponent = torch.frexp(big)
    ulp = torch.ldexp(torch.ones_like(big), exponent - 8)
    rounded = torch.round(mean / ulp) * ulp
    exact = torch.where(lo > 0, lo > rounded / 2, torch.where(hi < 0, hi < rounded / 2, torch.zeros_like(lo, dtype=torch.bool)))
    shift = torch.where(exact & (big > 0), rounded, torch.zeros_like(rounded))
    reach = torch.maximum((lo - shift).abs(), (hi - shift).abs())
    keep = ((mean - shift).square() <= 15 * var) & (reach.square() * rows.shape[1] <= 2.0**120)
    return torch.where(keep, shift, mean).float()


def far_from_zero_bf16_particles(n: int = 300, d: int = 64) -> dict[str, torch.Tensor]:
    """bf16 particles where no exact shift keeps the distances' expansion well conditioned (exact_bf16_shift
    falls back to the mean): "outlier", a cloud 0.2 % wide around feature scales from 0.1 to 100 with one
    particle at a quarter of them (below half the mean: no exact shift; 0 would leave |x|^2 ~ 2e5 times the
    distances); "range", values L or 3L (L = 1e18) per entry (0 would put |x|^2 d past fp32's range)."""
    generator = torch.Generator().manual_seed(0)
    scale = 10 ** (torch.rand(d, generator=generator, dtype=torch.float64) * 3 - 1)
    outlier = scale * (1 + 0.002 * torch.randn(n, d, generator=generator, dtype=torch.float64))
    outlier[0] = 0.25 * scale
    picks = 1 + 2 * (torch.rand(n, d, generator=generator) < 0.5).double()
    wide = 1e18 * picks * (1 + 0.01 * torch.randn(n, d, generator=generator, dtype=torch.float64))
    return {"outlier": outlier.bfloat16(), "range": wide.bfloat16()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (relative to the scale of the result)."""
    scale = expected.double().abs().max().clamp_min(1e-300)
    return float((actual.double() - expected.double()).abs().max() / scale)


def torch_error_in(dtype: torch.dtype, fn, *inputs64: torch.Tensor) -> float:
    """Error of fn run on inputs cast to `dtype` against fn in float64: the yardstick of the
    flash-attention rule (a kernel may be at most 2x worse than torch in the same precision)."""
    return relative_error(fn(*(t.to(dtype) for t in inputs64)), fn(*inputs64))


def self_backward_expected(grad: torch.Tensor, x: torch.Tensor, h) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (x's gradient, H's gradient) of sum(grad * K(x, x)), x on both sides, by the reference's
    autograd (the expectation of every backend's self-kernel backward)."""
    from bmt_fast import reference

    leaf = x.detach().double().requires_grad_(True)
    hh = torch.tensor(float(h), dtype=torch.float64, device=x.device, requires_grad=True)
    return torch.autograd.grad((reference.rbf_kernel(leaf, None, hh) * grad.double()).sum(), (leaf, hh))


FP32_FLOOR = 32 * torch.finfo(torch.float32).eps  # 3.8e-6: a few dozen ulps for sums with cancellation


def assert_within(actual: torch.Tensor, expected64: torch.Tensor, torch_error: float, floor: float = FP32_FLOOR) -> None:
    """The kernel's error is at most 2x torch's error in the same precision, but never held tighter than
    `floor` (kernels sum in a different order than torch, so tiny errors differ by a few ulps)."""
    err = relative_error(actual, expected64)
    bound = max(2.0 * torch_error, floor)
    assert err <= bound, f"relative error {err:.3e} > {bound:.3e} (torch in the same precision: {torch_error:.3e})"


def import_blocker(condition: str) -> str:
    """Python source for the start of a child interpreter's code: from then on `import <name>` fails as on a
    machine without that module, for every module name for which `condition` (an expression in `name`) holds."""
    return f"""
import sys
class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if {condition}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ for a child Python that must import this bmt_fast (also when it is not pip-installed:
    the folder that holds the package goes first on PYTHONPATH)."""
    import os
    from pathlib import Path

    root = str(Path(bmt_fast.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


# The CPU kernels' path switches (read once per process): run_cpu_variants sets each variant's own and clears
# the others, whatever the calling process has (CI runs the kernel tests with some of them set).
CPU_PATH_SWITCHES = ("BMT_FAST_CPU_FUSED", "BMT_FAST_CPU_SERIAL_MAX_WORK")


def run_cpu_variants(tmp_path, script_text: str, variants: dict[str, dict[str, str]]) -> dict[str, object]:
    """Runs script_text (which saves its results with torch.save to sys.argv[1]) once per variant in a
    child Python with that variant's CPU path switches, and returns the loaded results by variant name."""
    import subprocess
    import sys

    script = tmp_path / "variants.py"
    script.write_text(script_text)
    results = {}
    for name, extra in variants.items():
        path = tmp_path / f"{name}.pt"
        env = subprocess_env(**extra)
        for key in CPU_PATH_SWITCHES:
            if key not in extra:
                env.pop(key, None)
        run = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True)
        assert run.returncode == 0, (name, run.stderr[-2000:])
        results[name] = torch.load(path)
    return results
