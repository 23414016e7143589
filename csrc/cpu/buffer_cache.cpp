#include "cpu/buffer_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>

#include <cstring>
#include <iterator>
#include <list>
#include <map>
#include <mutex>
#include <utility>

namespace unet_fast::cpu {
namespace {

// Smaller tensors come from glibc's heap, whose pages are reused without the kernel's help.
constexpr size_t kSmallestCached = size_t{4} << 20;

// unet_fast sets the limit from UNET_FAST_CPU_CACHE_MIB when it loads.
constexpr int64_t kDefaultLimit = int64_t{1} << 30;

// Freed buffers, oldest first, and by size. When a freed buffer would pass the limit, the oldest
// go first: sizes no longer asked for (a smaller last batch, another tile) age out.
struct Cache {
  using Buffers = std::list<std::pair<size_t, void*>>;
  std::mutex lock;
  Buffers oldest_first;
  std::multimap<size_t, Buffers::iterator> by_size;
  int64_t cached = 0, limit = kDefaultLimit, hits = 0, misses = 0;

  void* take(size_t n) {
    {
      std::lock_guard<std::mutex> guard(lock);
      // the newest of that size: the likeliest to be in cache still
      auto it = by_size.upper_bound(n);
      if (it != by_size.begin() && (--it)->first == n) {
        void* data = it->second->second;
        oldest_first.erase(it->second);
        by_size.erase(it);
        cached -= static_cast<int64_t>(n);
        ++hits;
        return data;
      }
      ++misses;
    }
    return c10::alloc_cpu(n);
  }

  void give_back(void* data, size_t n) {
    Buffers evicted;
    {
      std::lock_guard<std::mutex> guard(lock);
      if (static_cast<int64_t>(n) > limit) {
        evicted.emplace_back(n, data);
      } else {
        while (cached + static_cast<int64_t>(n) > limit) pop_oldest(evicted);
        oldest_first.emplace_back(n, data);
        by_size.emplace(n, std::prev(oldest_first.end()));
        cached += static_cast<int64_t>(n);
      }
    }
    for (const auto& buffer : evicted) c10::free_cpu(buffer.second);
  }

  void reset(int64_t new_limit) {
    Buffers evicted;
    {
      std::lock_guard<std::mutex> guard(lock);
      while (!oldest_first.empty()) pop_oldest(evicted);
      limit = new_limit;
    }
    for (const auto& buffer : evicted) c10::free_cpu(buffer.second);
  }

  // Moves the oldest buffer to `evicted`, to be freed outside the lock.
  void pop_oldest(Buffers& evicted) {
    auto oldest = oldest_first.begin();
    auto [first, last] = by_size.equal_range(oldest->first);
    for (auto it = first; it != last; ++it) {
      if (it->second == oldest) {
        by_size.erase(it);
        break;
      }
    }
    cached -= static_cast<int64_t>(oldest->first);
    evicted.splice(evicted.end(), oldest_first, oldest);
  }
};

// A forked child starts with a cache of its own: the parent's lock may have been held at the fork.
// The parent's cached buffers are left to the child's copy-on-write mapping.
Cache* cache = nullptr;
std::once_flag cache_once;

Cache& the_cache() {
  std::call_once(cache_once, [] {
    cache = new Cache();
    pthread_atfork(nullptr, nullptr, [] { cache = new Cache(); });
  });
  return *cache;
}

struct Block {
  void* data;
  size_t bytes;
};

// torch.profiler's memory view counts the tensors as it counts the default allocator's.
void release(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  c10::profiledCPUMemoryReporter().Delete(block->data);
  the_cache().give_back(block->data, block->bytes);
  delete block;
}

struct CachingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n < kSmallestCached) return c10::GetCPUAllocator()->allocate(n);
    void* data = the_cache().take(n);
    c10::profiledCPUMemoryReporter().New(data, n);
    return {data, new Block{data, n}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

CachingAllocator allocator;

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), format);
}

CacheInfo cache_info() {
  Cache& c = the_cache();
  std::lock_guard<std::mutex> guard(c.lock);
  return {c.cached, c.limit, c.hits, c.misses};
}

void cache_reset(int64_t limit_bytes) { the_cache().reset(limit_bytes); }

}  // namespace unet_fast::cpu
