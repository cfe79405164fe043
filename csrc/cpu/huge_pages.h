// Large CPU results on transparent huge pages, reused.
//
// A fresh CPU tensor is paged in by the OS on first touch, one 4 KiB page at a time. On a virtual machine a
// fault costs more than the kernels spend on the page: on a 2-core Xeon VM a 67 MB rbf_kernel result
// (4096 x 4096 fp32) took ~20 ms of faults beside a ~14 ms GEMM, and a 26 MB svgd_step result ~11 ms
// beside a ~6 ms step whenever malloc handed back new pages (glibc maps fresh pages for every request over
// 32 MiB, and for smaller ones whenever its heap cannot serve them). Results and large temporaries of the
// CPU ops from kHugePageMinBytes on are therefore allocated 2 MiB-aligned and marked MADV_HUGEPAGE (where
// the kernel's transparent huge pages are "always" or "madvise" they fault in 2 MiB at a time; torch's own
// allocator does this only when THP_MEM_ALLOC_ENABLE=1 is set), and a freed block is kept for the next
// request of the same size: a loop that makes one such result per step pages it in once. The cache holds
// at most kHugePageCacheMaxBlocks freed blocks and kHugePageCacheMaxBytes in all, none over
// kHugePageCacheMaxBlockBytes (the oldest go back to the OS first). Not Linux: an ordinary allocation.
// From 1 MiB (4 MiB until 2026-12-04: under glibc's defaults the GEMM-tile step at 1024 x 768 paged in ~3,000
// pages of 3 MB temporaries a call, 16.2-18.0 ms against 12.6-12.7 ms with them reused), 16 blocks (that
// step alone frees seven). The storage is a normal resizable CPU storage. Allocations and frees are
// reported to torch.profiler's memory profiling like torch's own; a fork() child inherits the cache in a
// consistent state.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace bmt_fast::cpu {

constexpr int64_t kHugePageMinBytes = int64_t{1} << 20;
constexpr int64_t kHugePageCacheMaxBlocks = 16;
constexpr int64_t kHugePageCacheMaxBytes = int64_t{512} << 20;
constexpr int64_t kHugePageCacheMaxBlockBytes = int64_t{256} << 20;

// at::empty(sizes, options) for a contiguous CPU tensor, on huge pages from kHugePageMinBytes on.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

// What the allocator holds: bytes of blocks handed out and not yet freed (live), and freed blocks kept for
// reuse (cached; their count). For `bmt_fast.memory_stats()`.
struct HugePageStats {
  int64_t live_bytes;
  int64_t cached_bytes;
  int64_t cached_blocks;
};
HugePageStats huge_page_stats();

// Gives every cached block back to the OS (`bmt_fast.empty_cache()`, as torch.cuda.empty_cache does for
// torch's CUDA cache); live blocks are untouched and go to the cache again when freed.
void empty_huge_page_cache();

}  // namespace bmt_fast::cpu
