"""Build bmt_fast: the CPU extension always, the CUDA extension when nvcc and a CUDA build of torch exist.

Install with `pip install --no-build-isolation -e .` into an environment that already has torch (build
isolation would fetch an unpinned torch of several GB).

Environment variables:
    BMT_FAST_BUILD_CUDA=auto|0|1    build the CUDA extension (auto: when nvcc and CUDA torch are present)
    BMT_FAST_CUDA_ARCH_LIST="9.0"   compute capabilities for the CUDA build (default: "8.0;9.0+PTX")
    BMT_FAST_SKIP_CPU_BUILD=1       skip the compiled CPU extension (pure-torch reference only)
    BMT_FAST_DEBUG_INFO=1           keep DWARF debug info in the extensions (default: -g0)
    MAX_JOBS                        parallel compile jobs (torch's ninja builder)
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # PTX: newer devices (10.x, 12.x) compile it when loaded


def debug_info_flags() -> list[str]:
    """No DWARF in the extensions unless BMT_FAST_DEBUG_INFO=1: Python's own CFLAGS often carry -g, which made the
    CPU extension 40 MB (2.4 MB without), its wheel 13 MB. The symbols stay (perf, gdb backtraces)."""
    wanted = os.environ.get("BMT_FAST_DEBUG_INFO", "0")
    if wanted not in ("0", "1"):
        raise SystemExit(f"BMT_FAST_DEBUG_INFO must be 0 or 1, got {wanted!r}")
    return ["-g"] if wanted == "1" else ["-g0"]


def locate_cuda_home() -> None:
    """Point CUDA_HOME at a toolkit that has headers before torch.utils.cpp_extension reads it: torch
    infers it from the nvcc on PATH, which may be a wrapper script outside the toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ("/usr/local/cuda", "/opt/cuda"):
        if os.path.exists(os.path.join(candidate, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = candidate
            return


def relative_sources(*patterns: str) -> list[str]:
    return sorted(str(Path(p).relative_to(ROOT)) for pattern in patterns for p in glob.glob(str(ROOT / pattern)))


def cuda_decision(torch) -> tuple[bool, str]:
    """(build?, reason) for the CUDA extension."""
    wanted = os.environ.get("BMT_FAST_BUILD_CUDA", "auto").lower()
    if wanted not in ("auto", "0", "1"):
        raise SystemExit(f"BMT_FAST_BUILD_CUDA must be auto, 0 or 1, got {wanted!r}")
    if wanted == "0":
        return False, "BMT_FAST_BUILD_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME or "", "bin")) is None:
        problems.append("nvcc not found (set CUDA_HOME)")
    if not relative_sources("csrc/cuda/*.cu"):
        problems.append("no CUDA sources in csrc/cuda")
    if problems:
        if wanted == "1":
            raise SystemExit("BMT_FAST_BUILD_CUDA=1 but " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, ""


def write_build_info(info: dict) -> None:
    text = "# Written by setup.py at build time; not tracked by git.\nBUILD_INFO = " + repr(info) + "\n"
    (ROOT / "bmt_fast" / "_build_info.py").write_text(text)


def import_torch():
    """torch, or a message that says how to build: the extensions are compiled against the installed torch,
    which pip's default build isolation hides (it would build in a fresh environment without torch)."""
    try:
        import torch
    except ModuleNotFoundError as error:
        raise SystemExit(
            f"bmt_fast is built against an installed torch, and this build cannot import it ({error}). Install a "
            "pinned torch first (pip install torch==2.13.0), then build without isolation: pip install "
            "--no-build-isolation -e . (or pip wheel --no-build-isolation .)"
        ) from None
    return torch


def extensions():
    locate_cuda_home()
    torch = import_torch()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    info = {"torch_version": torch.__version__, "cpu": {"built": False}, "cuda": {"built": False}}
    exts = []
    if os.environ.get("BMT_FAST_SKIP_CPU_BUILD", "0") == "1":
        info["cpu"]["reason"] = "BMT_FAST_SKIP_CPU_BUILD=1"
        info["cuda"]["reason"] = "needs the CPU extension"
        write_build_info(info)
        return exts
    debug_info = debug_info_flags()
    cxx_flags = CXX_FLAGS + debug_info
    exts.append(
        CppExtension(
            "bmt_fast._C",
            relative_sources("csrc/*.cpp", "csrc/cpu/*.cpp"),
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    )
    info["cpu"] = {"built": True, "flags": " ".join(cxx_flags)}
    build_cuda, reason = cuda_decision(torch)
    if build_cuda:
        arch_list = os.environ.get("BMT_FAST_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        exts.append(
            CUDAExtension(
                "bmt_fast._C_cuda",
                relative_sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp"),
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++20", *debug_info],
                    "nvcc": ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"],
                },
            )
        )
        info["cuda"] = {"built": True, "arch_list": arch_list, "cuda_version": torch.version.cuda}
    else:
        info["cuda"]["reason"] = reason
    write_build_info(info)
    return exts


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
)
