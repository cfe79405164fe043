"""The CPU extension on aarch64 (Grace Hopper and Graviton hosts): the x86 ISA builds (AVX2, AVX-512, AMX)
sit behind __x86_64__ guards and the portable build takes GCC's generic vectors. Its sources compile with a
cross compiler (Debian: g++-aarch64-linux-gnu or g++-12-aarch64-linux-gnu), setup.py's flags and -Werror;
where scripts/aarch64_sysroot.sh has prepared an aarch64 user space, the objects are linked against PyPI's
aarch64 torch and the kernels run under qemu-user against the float64 reference. Skipped where the tools
are missing."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CROSS_COMPILERS = ("aarch64-linux-gnu-g++", *(f"aarch64-linux-gnu-g++-{v}" for v in (14, 13, 12)))


def cross_compiler() -> str | None:
    return next((found for name in CROSS_COMPILERS if (found := shutil.which(name))), None)


def setup_cxx_flags() -> list[str]:
    """setup.py's CXX_FLAGS, read from its source (importing setup.py would run the build)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CXX_FLAGS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py defines no CXX_FLAGS")


def aarch64_user_space() -> Path | None:
    """The aarch64 user space scripts/aarch64_sysroot.sh prepares (Debian's arm64 Python, PyPI's aarch64
    torch, CUDA stubs), where it is ready and qemu-user can run it."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bmt_fast" / "aarch64"
    folder = Path(os.environ.get("BMT_FAST_AARCH64_ROOT", default))
    ready = (folder / "READY").is_file() and shutil.which("qemu-aarch64-static") is not None
    return folder if ready else None


def aarch64_python(folder: Path) -> Path:
    return next((folder / "root" / "usr" / "bin").glob("python3.*[0-9]"))


@pytest.fixture(scope="module")
def aarch64_build(tmp_path_factory):
    """The CPU extension's objects cross-compiled for aarch64 with setup.py's flags and -Werror: against the
    aarch64 torch and Python headers where the user space is ready (so they can be linked and run), else the
    host's (the same torch headers; compiled only)."""
    compiler = cross_compiler()
    if compiler is None:
        pytest.skip("no aarch64 cross compiler (apt install g++-aarch64-linux-gnu)")
    import torch
    from torch.utils.cpp_extension import include_paths

    space = aarch64_user_space()
    if space is not None:
        torch_include = space / "site" / "torch" / "include"
        python = aarch64_python(space).name
        headers = [torch_include, torch_include / "torch" / "csrc" / "api" / "include",
                   space / "root" / "usr" / "include" / python, space / "root" / "usr" / "include"]
    else:
        headers = [*include_paths(), sysconfig.get_paths()["include"]]
    out_dir = tmp_path_factory.mktemp("aarch64")
    sources = sorted(ROOT.glob("csrc/*.cpp")) + sorted(ROOT.glob("csrc/cpu/*.cpp"))
    assert any(s.name == "kernels_base.cpp" for s in sources)
    flags = [*setup_cxx_flags(), "-g0", "-Werror", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{ROOT / 'csrc'}"]

    def compile_one(source: Path) -> tuple[Path, subprocess.CompletedProcess]:
        out = out_dir / f"{source.parent.name}_{source.stem}.o"
        command = [compiler, *flags, *(f"-I{h}" for h in headers), "-c", str(source), "-o", str(out)]
        return out, subprocess.run(command, capture_output=True, text=True, timeout=1200)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, sources))
    failed = {str(s.relative_to(ROOT)): run.stderr[-3000:] for s, (_, run) in zip(sources, results) if run.returncode}
    return compiler, space, [out for out, _ in results], failed


@pytest.mark.slow
def test_cpu_extension_compiles_for_aarch64(aarch64_build):
    _, _, objects, failed = aarch64_build
    assert not failed, failed
    # the objects are aarch64 code: ELF machine 183 (EM_AARCH64) at byte 18 of the header
    for out in objects:
        header = out.read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183, out.name


@pytest.mark.slow
def test_cpu_kernels_run_on_aarch64_under_qemu(aarch64_build, tmp_path):
    """Linked against PyPI's aarch64 torch and run by Debian's arm64 Python under qemu-user: the randomised
    comparison with float64 (every CPU path, the four dtypes) passes with the portable kernels, and the x86
    ISA builds are refused by name rather than ignored."""
    compiler, space, objects, failed = aarch64_build
    if space is None:
        pytest.skip("no aarch64 user space (bash scripts/aarch64_sysroot.sh) or no qemu-aarch64-static")
    assert not failed, failed
    python = aarch64_python(space)
    # a copy of the package, tests and benchmarks (helpers import benchmarks.providers) with the aarch64 .so
    for folder in ("bmt_fast", "benchmarks", "tests"):
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__", "_build_info.py", "results"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)  # pytest's settings
    suffix = f".cpython-{python.name.removeprefix('python').replace('.', '')}-aarch64-linux-gnu.so"
    library = tmp_path / "bmt_fast" / f"_C{suffix}"
    torch_lib = space / "site" / "torch" / "lib"
    link = subprocess.run([compiler, "-shared", "-fopenmp", "-o", str(library), *map(str, objects),
                           f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
                           f"-Wl,-rpath-link,{torch_lib}", f"-Wl,-rpath-link,{space / 'stubs'}"],
                          capture_output=True, text=True, timeout=600)
    assert link.returncode == 0, link.stderr[-3000:]
    # the build record setup.py writes (bmt_fast/_extension.py loads _C only where it says built)
    record = {"torch_version": "aarch64", "cpu": {"built": True}, "cuda": {"built": False, "reason": "aarch64 check"}}
    (tmp_path / "bmt_fast" / "_build_info.py").write_text(f"BUILD_INFO = {record!r}\n")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "OMP_NUM_THREADS": "2",
           "QEMU_LD_PREFIX": str(space / "root"), "LD_LIBRARY_PATH": str(space / "stubs"),
           "PYTHONPATH": f"{tmp_path}:{space / 'site'}", "PYTHONDONTWRITEBYTECODE": "1"}

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        command = ["qemu-aarch64-static", "-L", str(space / "root"), str(python), *args]
        return subprocess.run(command, cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True,
                              timeout=1800)

    info = run("-c", "import platform, bmt_fast; from bmt_fast import _extension as e; "
                     "print(platform.machine(), bmt_fast.available_backends(), e.CPU.module.build_info()['cpu_isa'])")
    assert info.returncode == 0, info.stderr[-3000:]
    assert info.stdout.split()[0] == "aarch64" and "'cpu'" in info.stdout and info.stdout.split()[-1] == "base", info.stdout
    tests = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_randomised.py")
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and "skipped" not in tests.stdout, tests.stdout[-2000:]
    refused = run("-c", "from bmt_fast import _extension as e; e.CPU.module.build_info()", BMT_FAST_CPU_ISA="v3")
    assert refused.returncode != 0 and "BMT_FAST_CPU_ISA=v3 but this CPU lacks the instructions" in refused.stderr, (
        refused.stderr[-2000:])
