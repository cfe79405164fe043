#include "huge_pages.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <utility>

#ifdef __linux__
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace bmt_fast::cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

struct Block {
  void* data;
  size_t bytes;
};

// Freed blocks kept for the next request of the same size (most recent last), within the limits of
// huge_pages.h: a loop that makes one large result per step reuses memory that is already paged in.
class BlockCache {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
      if (it->bytes == bytes) {
        void* data = it->data;
        cached_bytes_ -= bytes;
        blocks_.erase(std::next(it).base());
        return data;
      }
    }
    return nullptr;
  }

  void give(Block block) {
    if (block.bytes > static_cast<size_t>(kHugePageCacheMaxBlockBytes)) {
      std::free(block.data);
      return;
    }
    std::deque<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks_.push_back(block);
      cached_bytes_ += block.bytes;
      while (blocks_.size() > static_cast<size_t>(kHugePageCacheMaxBlocks) ||
             cached_bytes_ > static_cast<size_t>(kHugePageCacheMaxBytes)) {
        evicted.push_back(blocks_.front());
        cached_bytes_ -= blocks_.front().bytes;
        blocks_.pop_front();
      }
    }
    for (const Block& b : evicted) std::free(b.data);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

  std::pair<size_t, size_t> bytes_and_blocks() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_bytes_, blocks_.size()};
  }

  void clear() {
    std::deque<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evicted.swap(blocks_);
      cached_bytes_ = 0;
    }
    for (const Block& b : evicted) std::free(b.data);
  }

  // fork(): the mutex is held across it (no thread is inside the cache then), so a child starts with a
  // consistent cache and an unlocked mutex even when another thread of the parent was allocating.
  void lock_for_fork() { mutex_.lock(); }
  void unlock_after_fork() { mutex_.unlock(); }

 private:
  std::mutex mutex_;
  std::deque<Block> blocks_;
  size_t cached_bytes_ = 0;
};

// Made when the library is loaded, before any thread can allocate (a function-local static is made by the
// first call, and a fork during that initialisation leaves its guard locked in the child: seen in
// csrc/tests); never destroyed: storages may be freed during static teardown.
BlockCache* const g_cache = [] {
  auto* created = new BlockCache();
#ifdef __linux__
  pthread_atfork([] { g_cache->lock_for_fork(); }, [] { g_cache->unlock_after_fork(); },
                 [] { g_cache->unlock_after_fork(); });
#endif
  return created;
}();

BlockCache& cache() { return *g_cache; }

// Bytes of live blocks handed out (the cache holds the rest of what the allocator reserved).
std::atomic<size_t> live_bytes{0};

// torch.profiler(profile_memory=True) sees these blocks as it sees torch's own CPU allocations.
void report_to_profiler(void* data, int64_t delta) {
  if (c10::memoryProfilingEnabled()) {
    const size_t live = live_bytes.load();
    c10::reportMemoryUsageToProfiler(data, delta, live, live + cache().cached_bytes(),
                                     c10::Device(c10::DeviceType::CPU));
  }
}

void release(void* context) {
  auto* block = static_cast<Block*>(context);
  live_bytes -= block->bytes;
  report_to_profiler(block->data, -static_cast<int64_t>(block->bytes));
  cache().give(*block);
  delete block;
}

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes == 0) return {nullptr, c10::Device(c10::DeviceType::CPU)};
    void* data = cache().take(nbytes);
    if (data == nullptr) {
      TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&data, kHugePage, nbytes) == 0,
                       "bmt_fast: could not allocate ", nbytes, " bytes on the CPU");
#ifdef MADV_HUGEPAGE
      // Whole 2 MiB pages only; a hint (EINVAL where THP is compiled out), so its result is ignored.
      if (nbytes >= kHugePage) (void)madvise(data, nbytes / kHugePage * kHugePage, MADV_HUGEPAGE);
#endif
    }
    live_bytes += nbytes;
    report_to_profiler(data, static_cast<int64_t>(nbytes));
    return {data, new Block{data, nbytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  // The context is not the data pointer: no raw_allocate / raw_deallocate.
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

HugePageAllocator* const g_allocator = new HugePageAllocator();  // made at load and kept, like the cache

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
#ifdef __linux__
  if (bytes >= kHugePageMinBytes) {
    return at::Tensor(at::detail::empty_generic(sizes, g_allocator,
                                                c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                options.dtype().toScalarType(), c10::MemoryFormat::Contiguous));
  }
#endif
  return at::empty(sizes, options.memory_format(c10::MemoryFormat::Contiguous));
}

HugePageStats huge_page_stats() {
  const auto [cached, blocks] = cache().bytes_and_blocks();
  return {static_cast<int64_t>(live_bytes.load()), static_cast<int64_t>(cached), static_cast<int64_t>(blocks)};
}

void empty_huge_page_cache() { cache().clear(); }

}  // namespace bmt_fast::cpu
