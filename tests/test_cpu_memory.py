"""Large results of the CPU ops: 2 MiB-aligned blocks on transparent huge pages, kept for reuse
(csrc/cpu/huge_pages.h), which must be invisible to callers apart from the speed."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import requires_cpu_extension

import bmt_fast
from bmt_fast import _extension, reference

pytestmark = [requires_cpu_extension, pytest.mark.skipif(sys.platform != "linux", reason="Linux only")]

HUGE_PAGE = 2 << 20


def info() -> dict:
    return _extension.CPU.module.build_info()


def test_build_info_reports_the_threshold():
    assert info()["huge_page_min_bytes"] == 1 << 20


def large_particles(seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    x = torch.randn(16, 70_000, dtype=torch.float64)  # 4.5 MB in fp32: over the threshold
    return x.to(dtype), torch.randn_like(x).to(dtype)


@pytest.mark.parametrize("check_inputs", [True, False])  # the API allocates phi / the op does
def test_large_svgd_results_are_aligned_reused_and_fully_written(check_inputs):
    x, s = large_particles(0)
    phi = bmt_fast.svgd_step(x, s, check_inputs=check_inputs)
    assert phi.data_ptr() % HUGE_PAGE == 0 and phi.is_contiguous() and phi.shape == x.shape
    expected = reference.svgd_step(x.double(), s.double(), None)
    torch.testing.assert_close(phi.double(), expected, rtol=2e-5, atol=1e-7)
    ptr = phi.data_ptr()
    phi.fill_(float("nan"))  # a freed block keeps its old contents: the next result must overwrite all of it
    del phi
    x2, s2 = large_particles(1)
    again = bmt_fast.svgd_step(x2, s2, check_inputs=check_inputs)
    assert again.data_ptr() == ptr  # the same block, from the cache
    torch.testing.assert_close(again.double(), reference.svgd_step(x2.double(), s2.double(), None), rtol=2e-5, atol=1e-7)


def test_small_results_use_torchs_allocator():
    x = torch.randn(16, 1000)
    phi = bmt_fast.svgd_step(x, torch.randn_like(x), check_inputs=False)
    k = bmt_fast.rbf_kernel(x)
    assert phi.untyped_storage().nbytes() < info()["huge_page_min_bytes"]
    assert k.untyped_storage().nbytes() < info()["huge_page_min_bytes"]


def test_large_kernel_matrix_and_its_gradients():
    torch.manual_seed(2)
    x = torch.randn(1100, 5, dtype=torch.float64, requires_grad=True)  # K: 9.7 MB in fp64
    h = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    k = bmt_fast.rbf_kernel(x, None, h)
    assert k.data_ptr() % HUGE_PAGE == 0
    weights = torch.randn(1100, 1100, dtype=torch.float64)
    grads = torch.autograd.grad((k * weights).sum(), (x, h))
    expected = torch.autograd.grad((reference.rbf_kernel(x, None, h) * weights).sum(), (x, h))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_a_large_result_is_an_ordinary_resizable_tensor():
    x, s = large_particles(3)
    phi = bmt_fast.svgd_step(x, s, check_inputs=False)
    before = phi.clone()
    phi.resize_(32, 70_000)  # grows through the same allocator, keeping the first half
    torch.testing.assert_close(phi[:16], before, rtol=0, atol=0)
    phi[16:] = 1.0
    assert phi.untyped_storage().nbytes() == 32 * 70_000 * 4
    view = phi[::2]
    del phi
    assert float(view[8].sum()) == 70_000.0  # the storage lives as long as a view of it


def test_profiler_sees_large_results_allocated_and_freed():
    """torch.profiler(profile_memory=True) counts the huge-page blocks as it counts torch's allocations."""
    from torch.profiler import profile

    x = torch.randn(2048, 16)  # K: 16 MiB
    h = torch.tensor(16.0)
    nbytes = 2048 * 2048 * 4
    with profile(profile_memory=True) as prof:
        k = bmt_fast.rbf_kernel(x, None, h, check_inputs=False)
        assert k.untyped_storage().nbytes() == nbytes and k.data_ptr() % HUGE_PAGE == 0
        del k
    op = next(e for e in prof.key_averages() if e.key == "bmt_fast::rbf_kernel")
    assert op.cpu_memory_usage >= nbytes
    freed = [e for e in prof.events() if e.name == "[memory]" and e.cpu_memory_usage == -nbytes]
    assert len(freed) == 1


def test_memory_stats_and_empty_cache():
    """bmt_fast.memory_stats() counts the blocks handed out and those kept; empty_cache() frees the kept ones
    (a process whose loop of large steps is over gets the memory back) and leaves live results alone."""
    bmt_fast.empty_cache()
    start = bmt_fast.memory_stats()
    assert start["cached_bytes"] == 0 and start["cached_blocks"] == 0
    x, s = large_particles(4)
    phi = bmt_fast.svgd_step(x, s, check_inputs=False)
    nbytes = phi.untyped_storage().nbytes()
    live = bmt_fast.memory_stats()
    assert live["live_bytes"] == start["live_bytes"] + nbytes  # the op's temporaries are back in the cache
    kept = phi.clone()
    del phi
    freed = bmt_fast.memory_stats()
    assert freed["live_bytes"] == start["live_bytes"] and freed["cached_bytes"] >= nbytes
    assert freed["cached_blocks"] >= 1
    other = bmt_fast.svgd_step(x, s, check_inputs=False)  # live while the cache is emptied
    bmt_fast.empty_cache()
    emptied = bmt_fast.memory_stats()
    assert emptied["cached_bytes"] == 0 and emptied["cached_blocks"] == 0
    assert emptied["live_bytes"] == start["live_bytes"] + nbytes
    torch.testing.assert_close(other, kept, rtol=0, atol=0)  # untouched by empty_cache
    del other
    assert bmt_fast.memory_stats()["cached_blocks"] == 1  # freed after: cached again
    again = bmt_fast.svgd_step(x, s, check_inputs=False)
    torch.testing.assert_close(again, kept, rtol=0, atol=0)


def test_memory_functions_without_the_extension(monkeypatch):
    monkeypatch.setattr(_extension.CPU, "module", None)
    assert bmt_fast.memory_stats() == {"live_bytes": 0, "cached_bytes": 0, "cached_blocks": 0}
    bmt_fast.empty_cache()
