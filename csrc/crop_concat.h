// crop_concat semantics shared by the CPU and CUDA backends; each supplies only its `fill`.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <tuple>
#include <vector>

#include "cpu/buffer_cache.h"

namespace unet_fast {

// Offset of an input inside a target of `target` elements along one axis: F.pad's split
// [d // 2, d - d // 2] with d = target - current (negative d crops), Python floor division.
inline int64_t leading_pad(int64_t target, int64_t current) {
  const int64_t d = target - current;
  return d >= 0 ? d / 2 : -((1 - d) / 2);
}

// dst[n, channel_offset + c, h, w] = src[n, c, h - top, w - left], zero where that is outside src.
struct ShiftedSource {
  at::Tensor src;
  int64_t channel_offset;
  int64_t top;
  int64_t left;
};

// The forward op for a backend whose `fill(dst, sources)` writes dst (dense in its memory format)
// from its shifted sources. The output follows skip's memory format.
template <typename Fill>
at::Tensor crop_concat_with(const at::Tensor& skip, const at::Tensor& up, c10::IntArrayRef size,
                            Fill fill) {
  // The Python wrapper gives friendlier messages first; these protect direct torch.ops calls.
  TORCH_CHECK(skip.dim() == 4 && up.dim() == 4,
              "crop_concat: expected 4-D (N, C, H, W) tensors, got skip of shape ", skip.sizes(),
              " and up of shape ", up.sizes());
  TORCH_CHECK(skip.size(0) == up.size(0), "crop_concat: batch sizes differ, skip ", skip.size(0),
              " vs up ", up.size(0));
  TORCH_CHECK(skip.scalar_type() == up.scalar_type(), "crop_concat: dtypes differ, skip ",
              skip.scalar_type(), " vs up ", up.scalar_type());
  TORCH_CHECK(skip.device() == up.device(), "crop_concat: devices differ, skip ", skip.device(),
              " vs up ", up.device());
  TORCH_CHECK(size.size() == 2 && size[0] >= 0 && size[1] >= 0,
              "crop_concat: size must be two non-negative integers (H, W), got ", size);
  at::Tensor out = cached_empty({skip.size(0), skip.size(1) + up.size(1), size[0], size[1]},
                                skip.options(), skip.suggest_memory_format());
  if (out.numel() > 0) {
    fill(out, std::vector<ShiftedSource>{
                  {skip, 0, leading_pad(size[0], skip.size(2)), leading_pad(size[1], skip.size(3))},
                  {up, skip.size(1), leading_pad(size[0], up.size(2)),
                   leading_pad(size[1], up.size(3))}});
  }
  return out;
}

// The backward op: each channel slice of grad shifted back by its forward offset. The gradients
// follow grad's memory format.
template <typename Fill>
std::tuple<at::Tensor, at::Tensor> crop_concat_backward_with(const at::Tensor& grad,
                                                             int64_t skip_channels,
                                                             c10::IntArrayRef skip_size,
                                                             c10::IntArrayRef up_size, Fill fill) {
  TORCH_CHECK(grad.dim() == 4 && skip_channels >= 0 && skip_channels <= grad.size(1),
              "crop_concat_backward: grad of shape ", grad.sizes(), " cannot hold ", skip_channels,
              " skip channels");
  const auto format = grad.suggest_memory_format();
  const int64_t N = grad.size(0), C = grad.size(1);
  auto slice_back = [&](int64_t begin, int64_t end, c10::IntArrayRef size) {
    at::Tensor dst = cached_empty({N, end - begin, size[0], size[1]}, grad.options(), format);
    if (dst.numel() > 0) {
      fill(dst, std::vector<ShiftedSource>{{grad.narrow(1, begin, end - begin), 0,
                                            -leading_pad(grad.size(2), size[0]),
                                            -leading_pad(grad.size(3), size[1])}});
    }
    return dst;
  };
  return {slice_back(0, skip_channels, skip_size), slice_back(skip_channels, C, up_size)};
}

}  // namespace unet_fast
