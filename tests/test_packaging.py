"""The source distribution: `pip install bmt_fast-<version>.tar.gz` on a machine that has only the sdist must
build the same extension a checkout builds. setuptools puts into an sdist the packages' Python files and the
extension's .cpp sources, not the headers they include (csrc/cpu/*.h, csrc/cuda/*.cuh), so without
MANIFEST.in a build from the sdist stopped at its first #include. These tests make the sdist from a copy of
the tracked files (as a clean clone has them), check what it carries, and build a wheel from it that then
runs from outside the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import import_blocker

ROOT = Path(__file__).resolve().parents[1]


def tracked_files() -> list[str]:
    try:
        run = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"git is not usable here: {exc}")
    if run.returncode != 0 or not run.stdout:
        pytest.skip("not a git checkout (the sdist is made from the tracked files)")
    return [name for name in run.stdout.decode().split("\0") if name]


def left_out_of_sdist(name: str) -> bool:
    """Tracked files an sdist need not carry: the CI entry point, git's own file and the plots."""
    return name.startswith(".ci/") or name == ".gitignore" or name.endswith(".png")


def build_env(**extra: str) -> dict[str, str]:
    import os

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, "BMT_FAST_BUILD_CUDA": "0", "MAX_JOBS": env.get("MAX_JOBS", "2"), **extra}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The sdist of a copy of the tracked files (the checkout's untracked build outputs stay out)."""
    names = tracked_files()
    source = tmp_path_factory.mktemp("clone")
    for name in names:
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, target)
    dist = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(dist)], cwd=source,
                         env=build_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    (archive,) = dist.glob("bmt_fast-*.tar.gz")
    return archive


def sdist_members(archive: Path) -> set[str]:
    with tarfile.open(archive) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = {name.split("/", 1)[0] for name in names}
    assert len(top) == 1, top
    return {name.split("/", 1)[1] for name in names}


def test_sdist_carries_every_tracked_source(sdist):
    members = sdist_members(sdist)
    wanted = {name for name in tracked_files() if not left_out_of_sdist(name) and (ROOT / name).is_file()}
    missing = sorted(wanted - members)
    assert not missing, f"{len(missing)} tracked files are not in the sdist (MANIFEST.in): {missing[:20]}"
    # the headers a build includes, named, so that a graft narrowed later cannot drop them unnoticed
    for header in ("csrc/bmt_fast.h", "csrc/cpu/kernels_impl.h", "csrc/cpu/median_select.h", "csrc/cuda/gram.cuh",
                   "csrc/cuda/emulation/emulator.h"):  # fmt: skip
        assert header in members
    # nothing of the machine that made it: no build info of its build, no compiled objects, no plots
    leaked = sorted(m for m in members if m == "bmt_fast/_build_info.py" or m.endswith((".so", ".o", ".pyc", ".png")))
    assert not leaked, leaked


# Runs in a child Python whose cwd and sys.path hold only the installed wheel (no checkout).
FROM_THE_WHEEL = """
import sys
from pathlib import Path
import torch
import bmt_fast
from bmt_fast import reference
site = Path(sys.argv[1]).resolve()
assert Path(bmt_fast.__file__).resolve().is_relative_to(site), bmt_fast.__file__
assert Path(bmt_fast._extension.CPU.module.__file__).resolve().is_relative_to(site)
assert "cpu" in bmt_fast.available_backends(), bmt_fast.available_backends()
torch.manual_seed(0)
worst = 0.0
for n, d in ((16, 4096), (300, 24)):  # the Gram pass (few particles) and the fused many-particle kernel
    x = torch.randn(n, d)
    score = -x + 0.1 * torch.randn(n, d)
    h = 2.0 * d
    phi = bmt_fast.svgd_step(x, score, h, backend="cpu")
    expected = reference.svgd_step(x.double(), score.double(), torch.tensor(h, dtype=torch.float64))
    worst = max(worst, float((phi.double() - expected).abs().max() / expected.abs().max()))
print(worst)
"""


@pytest.mark.slow
def test_wheel_built_from_the_sdist_runs_outside_the_checkout(sdist, tmp_path):
    unpacked = tmp_path / "unpacked"
    with tarfile.open(sdist) as tar:
        tar.extractall(unpacked, filter="data")
    (source,) = unpacked.iterdir()
    wheels = tmp_path / "wheels"
    # CPU only: the CUDA extension's sources are checked above; its build from a checkout is test_cuda_build's.
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-build-isolation",
         "--no-deps", "--wheel-dir", str(wheels), str(source)],
        env=build_env(), capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-4000:]
    (wheel,) = wheels.glob("bmt_fast-*.whl")
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--target",
         str(site), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-4000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = build_env(PYTHONPATH=str(site))
    run = subprocess.run([sys.executable, "-c", FROM_THE_WHEEL, str(site)], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert float(run.stdout.strip()) < 1e-5
    info = subprocess.run([sys.executable, "-m", "bmt_fast.info"], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert info.returncode == 0, info.stderr[-4000:]
    (backends,) = [line for line in info.stdout.splitlines() if line.startswith("available backends:")]
    assert "cpu" in backends.split(":", 1)[1].replace(",", " ").split(), info.stdout
    # the licence the metadata names travels with the wheel
    (dist_info,) = site.glob("bmt_fast-*.dist-info")
    assert (dist_info / "licenses" / "LICENSE").read_bytes() == (ROOT / "LICENSE").read_bytes()
    metadata = (dist_info / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata, metadata[:2000]
    # built without DWARF (setup.py's -g0 unless BMT_FAST_DEBUG_INFO=1): 40 MB with it, 2.4 MB without
    (extension,) = (site / "bmt_fast").glob("_C.*.so")
    if shutil.which("readelf"):
        sections = subprocess.run(["readelf", "-S", "-W", str(extension)], capture_output=True, text=True, timeout=60)
        assert sections.returncode == 0 and ".text" in sections.stdout, sections.stderr
        assert ".debug_info" not in sections.stdout


# setup.py run where torch cannot be imported, as under pip's default build isolation.
WITHOUT_TORCH = import_blocker('name == "torch" or name.startswith("torch.")') + """
import runpy
sys.argv = ["setup.py", "--name"]
runpy.run_path("setup.py", run_name="__main__")
"""


def test_a_build_without_torch_says_how_to_build(tmp_path):
    """pip's default build isolation hides the installed torch from setup.py: the build stops with how to
    build instead of a traceback."""
    shutil.copy2(ROOT / "setup.py", tmp_path / "setup.py")
    run = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], cwd=tmp_path, env=build_env(), capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    assert "cannot import it (No module named 'torch')" in run.stderr
    assert "pip install --no-build-isolation -e ." in run.stderr
