"""The CPU extension's sources compile for aarch64 (Grace Hopper and Graviton hosts): the x86 ISA builds
(AVX2, AVX-512, AMX) sit behind __x86_64__ guards and the portable build takes GCC's generic vectors.
Compiled, not linked or run: with a cross compiler (Debian: g++-aarch64-linux-gnu or
g++-12-aarch64-linux-gnu), setup.py's flags and -Werror; skipped where none is installed."""

from __future__ import annotations

import ast
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


@pytest.mark.slow
@pytest.mark.skipif(cross_compiler() is None, reason="no aarch64 cross compiler (apt install g++-aarch64-linux-gnu)")
def test_cpu_extension_compiles_for_aarch64(tmp_path):
    from torch.utils.cpp_extension import include_paths

    sources = sorted(ROOT.glob("csrc/*.cpp")) + sorted(ROOT.glob("csrc/cpu/*.cpp"))
    assert any(s.name == "kernels_base.cpp" for s in sources)
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    flags = [*setup_cxx_flags(), "-Werror", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]

    def compile_one(source: Path) -> tuple[Path, subprocess.CompletedProcess]:
        out = tmp_path / f"{source.parent.name}_{source.stem}.o"
        command = [cross_compiler(), *flags, *includes, "-c", str(source), "-o", str(out)]
        return out, subprocess.run(command, capture_output=True, text=True, timeout=1200)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, sources))
    failed = {str(s.relative_to(ROOT)): run.stderr[-3000:] for s, (_, run) in zip(sources, results) if run.returncode}
    assert not failed, failed
    # the objects are aarch64 code: ELF machine 183 (EM_AARCH64) at byte 18 of the header
    for out, _ in results:
        header = out.read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183, out.name
