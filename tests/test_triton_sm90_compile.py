"""Every Triton kernel specialisation the public ops launch compiles for sm_90 (H100/H200) and fits its
shared memory, and every tensor-core precision mode (TF32, bf16, split bf16) compiles to Hopper's wgmma
instructions, checked on a machine without a GPU (see tests/triton_sm90_compile.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env
from triton_helpers import HAS_GPU

SCRIPT = Path(__file__).with_name("triton_sm90_compile.py")


def _nvidia_backend() -> str:
    try:
        from triton.backends import backends

        return "" if "nvidia" in backends else "Triton has no NVIDIA backend"
    except Exception as exc:  # noqa: BLE001
        return f"triton cannot be imported: {exc}"


@pytest.mark.skipif(HAS_GPU, reason="on a GPU the kernels compile and run in the Triton tests themselves")
@pytest.mark.skipif(bool(_nvidia_backend()), reason=_nvidia_backend() or "ok")
def test_kernels_compile_for_sm90_within_shared_memory(tmp_path):
    launches = tmp_path / "launches.json"
    env = subprocess_env(TRITON_INTERPRET="1")
    subprocess.run([sys.executable, str(SCRIPT), "record", str(launches)], env=env, check=True, timeout=600)
    recorded = json.loads(launches.read_text())
    names = {entry["name"] for entry in recorded}
    assert {"_svgd_step_kernel", "_svgd_flash_kernel", "_flash_operands_kernel", "_svgd_combine_kernel", "_gram_kernel", "_gram_dists_kernel", "_rank_select_kernel", "_median_of_ranks_kernel", "_rbf_kernel_kernel",
            "_rbf_kernel_grad_kernel", "_radix_histogram_kernel", "_centring_sum_kernel"} <= names  # fmt: skip
    env = {k: v for k, v in subprocess_env().items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), "compile", str(launches)], env=env, check=True,
                         timeout=900, capture_output=True, text=True)  # fmt: skip
    report = json.loads(out.stdout)
    fixed = [r for r in report["results"] if not r["candidate"]]
    assert len(fixed) == len(recorded)
    # the small candidate tiles of the kernels of few rows, in every precision mode
    candidates = [r for r in report["results"] if r["candidate"]]
    assert {r["kernel"] for r in candidates} == {"_gram_kernel", "_svgd_step_kernel", "_rbf_kernel_grad_kernel"}
    assert {r["consts"]["BLOCK_M"] for r in candidates} == {"16", "32"}
    assert {r["consts"]["MODE"] for r in candidates} >= {"0", "1", "2", "3"}
    errors = [r for r in report["results"] if "error" in r]
    assert not errors, errors[:3]
    too_big = [r for r in report["results"] if r["shared"] > report["shared_limit"]]
    assert not too_big, too_big
    # the gradient kernel of two sets and of a self kernel's symmetrised weights (grad^T's tiles read too)
    grads = [r for r in report["results"] if r["kernel"] == "_rbf_kernel_grad_kernel"]
    assert {r["consts"]["SYMMETRISED"] for r in grads} == {"True", "False"}
    # MODE 0 is the IEEE fp32/fp64 dot (FMA units); the other modes exist to run on the tensor cores
    # (at the fixed tile: below 64 rows a warpgroup MMA has no use, and Triton takes mma.sync)
    # (the flash operands kernel only rounds its operands, the combine pass only reads MODE for the step's form)
    without_products = {"_flash_operands_kernel", "_svgd_combine_kernel"}
    with_mode = [r for r in fixed if "MODE" in r["consts"] and r["kernel"] not in without_products]
    assert {r["consts"]["MODE"] for r in with_mode} >= {"0", "1", "2", "3"}
    no_wgmma = [r for r in with_mode if r["consts"]["MODE"] != "0" and not r["wgmma"]]
    assert not no_wgmma, no_wgmma
    # The flash kernel (the many-particle step in the tensor-core modes) keeps its loop in registers at the
    # fixed tile, with aligned operands as on a GPU: no spill stores (the tiled kernel spills at most tiles).
    flash = [r for r in report["results"] if r["kernel"] == "_svgd_flash_kernel"]
    assert {r["consts"]["MODE"] for r in flash} == {"1", "2", "3"}
    assert all(r["spill_bytes"] == 0 and r["registers"] <= 255 for r in flash), flash
