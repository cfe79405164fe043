#include "huge_pages.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>

#ifdef __linux__
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

 private:
  std::mutex mutex_;
  std::deque<Block> blocks_;
  size_t cached_bytes_ = 0;
};

BlockCache& cache() {
  static auto* blocks = new BlockCache();  // never destroyed: storages may be freed during static teardown
  return *blocks;
}

void release(void* context) {
  auto* block = static_cast<Block*>(context);
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
    return {data, new Block{data, nbytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  // The context is not the data pointer: no raw_allocate / raw_deallocate.
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

HugePageAllocator& huge_page_allocator() {
  static auto* allocator = new HugePageAllocator();  // never destroyed, like the cache
  return *allocator;
}

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
#ifdef __linux__
  if (bytes >= kHugePageMinBytes) {
    return at::Tensor(at::detail::empty_generic(sizes, &huge_page_allocator(),
                                                c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                options.dtype().toScalarType(), c10::MemoryFormat::Contiguous));
  }
#endif
  return at::empty(sizes, options.memory_format(c10::MemoryFormat::Contiguous));
}

}  // namespace bmt_fast::cpu
