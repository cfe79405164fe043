"""A checkout's root on sys.path (`python -m ...`, `python -c` or `python -m pytest` run from it) makes the
Triton kernels' directory importable as a top-level `kernels`, the import name of Hugging Face's kernels
package, which transformers probes for by importing whatever `kernels` it finds without metadata. There our
package must stay empty: no Triton import (a machine without Triton could not import transformers'
activations, hence no model), no second copy of the bmt_fast_triton ops."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import import_blocker, subprocess_env

ROOT = Path(__file__).resolve().parents[1]

# A child interpreter on a machine without Triton: importing it fails as it would there.
WITHOUT_TRITON = import_blocker('name == "triton" or name.startswith("triton.")')


def run_from_checkout(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TRITON + code], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_top_level_kernels_is_an_empty_package():
    r = run_from_checkout(
        "import kernels\n"
        "print(kernels.__file__)\n"
        "print(kernels.__all__, sorted(m for m in sys.modules if m.startswith('kernels.')), 'triton' in sys.modules)"
    )
    assert r.returncode == 0, r.stderr
    file, state = r.stdout.strip().splitlines()
    assert Path(file).resolve() == ROOT / "kernels" / "__init__.py"  # (the clash this test is about)
    assert state == "[] [] False"


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_transformers_imports_from_a_checkout_without_triton():
    r = run_from_checkout(
        "import transformers.activations\n"
        "from transformers.utils import is_kernels_available\n"
        "print(is_kernels_available(), [m for m in sys.modules if m.startswith('kernels.')])"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False []"
