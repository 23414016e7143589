// Large CPU buffers, kept for reuse. glibc maps every allocation of 32 MiB or more afresh and
// unmaps it on free, so each new large tensor is faulted in page by page on first touch: about
// 8 ms per 32 MiB on a 2-core VM, as long as the kernel that fills it. A training step asks for
// the same sizes step after step, so the CPU kernels take their large tensors from this cache: a
// freed buffer waits, within a byte limit, for the next request of its exact size (CUDA's caching
// allocator does the same for every tensor). Its tensors are ordinary, resizable CPU tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

namespace unet_fast::cpu {

// at::empty on the CPU, from the cache when the tensor is large.
at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                 at::MemoryFormat format = at::MemoryFormat::Contiguous);

inline at::Tensor empty_like(const at::Tensor& t, at::MemoryFormat format) {
  return empty(t.sizes(), t.options(), format);
}

struct CacheInfo {
  int64_t cached_bytes, limit_bytes, hits, misses;
};

CacheInfo cache_info();
// Frees the cached buffers and keeps at most `limit_bytes` of freed ones from now on (0: none).
void cache_reset(int64_t limit_bytes);

}  // namespace unet_fast::cpu

namespace unet_fast {

// at::empty, large CPU tensors from the cache: for code the CPU and CUDA backends share.
inline at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                               at::MemoryFormat format) {
  return options.device().is_cpu() ? cpu::empty(sizes, options, format)
                                   : at::empty(sizes, options, format);
}

}  // namespace unet_fast
