// crop_concat on CUDA: one thread per output element in the output's memory order, so both
// NCHW and channels_last outputs are written coalesced. Copies raw bits, so it is dtype-agnostic.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "crop_concat.h"

namespace unet_fast {
namespace {

template <typename T>
struct DeviceSource {
  const T* data;
  int64_t channel_end, channel_begin, height, width, top, left;
  int64_t stride_n, stride_c, stride_h, stride_w;
};

template <typename T>
__global__ void shifted_concat_kernel(T* __restrict__ dst, int64_t numel, int64_t C, int64_t H,
                                      int64_t W, bool channels_last, DeviceSource<T> first,
                                      DeviceSource<T> second) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel; i += step) {
    int64_t n, c, h, w;
    if (channels_last) {
      c = i % C; w = (i / C) % W; h = (i / (C * W)) % H; n = i / (C * W * H);
    } else {
      w = i % W; h = (i / W) % H; c = (i / (W * H)) % C; n = i / (W * H * C);
    }
    const DeviceSource<T>& s = c < first.channel_end ? first : second;
    const int64_t hs = h - s.top, ws = w - s.left;
    T value = T(0);  // all-zero bits: +0.0 in every floating dtype
    if (hs >= 0 && hs < s.height && ws >= 0 && ws < s.width) {
      value = s.data[n * s.stride_n + (c - s.channel_begin) * s.stride_c + hs * s.stride_h +
                     ws * s.stride_w];
    }
    dst[i] = value;
  }
}

template <typename T>
DeviceSource<T> device_source(const ShiftedSource& s) {
  return {static_cast<const T*>(s.src.const_data_ptr()), s.channel_offset + s.src.size(1),
          s.channel_offset, s.src.size(2), s.src.size(3), s.top, s.left,
          s.src.stride(0), s.src.stride(1), s.src.stride(2), s.src.stride(3)};
}

template <typename T>
void launch(at::Tensor& dst, const ShiftedSource& first, const ShiftedSource& second) {
  const int64_t numel = dst.numel();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((numel + threads - 1) / threads, 65535LL * 8);
  const bool channels_last = !dst.is_contiguous();
  shifted_concat_kernel<T><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<T*>(dst.data_ptr()), numel, dst.size(1), dst.size(2), dst.size(3),
      channels_last, device_source<T>(first), device_source<T>(second));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Fills dst (freshly allocated, dense in its memory format) from one or two shifted sources.
void shifted_concat(at::Tensor& dst, const std::vector<ShiftedSource>& sources) {
  const c10::cuda::CUDAGuard guard(dst.device());
  const ShiftedSource& first = sources.front();
  const ShiftedSource& second = sources.back();
  switch (dst.element_size()) {
    case 1: return launch<uint8_t>(dst, first, second);
    case 2: return launch<uint16_t>(dst, first, second);
    case 4: return launch<uint32_t>(dst, first, second);
    case 8: return launch<uint64_t>(dst, first, second);
    default: TORCH_CHECK(false, "crop_concat: unsupported element size ", dst.element_size());
  }
}

at::Tensor crop_concat_cuda(const at::Tensor& skip, const at::Tensor& up, c10::IntArrayRef size) {
  return crop_concat_with(skip, up, size, shifted_concat);
}

std::tuple<at::Tensor, at::Tensor> crop_concat_backward_cuda(const at::Tensor& grad,
                                                             int64_t skip_channels,
                                                             c10::IntArrayRef skip_size,
                                                             c10::IntArrayRef up_size) {
  return crop_concat_backward_with(grad, skip_channels, skip_size, up_size, shifted_concat);
}

}  // namespace
}  // namespace unet_fast

TORCH_LIBRARY_IMPL(unet_fast, CUDA, m) {
  m.impl("crop_concat", &unet_fast::crop_concat_cuda);
  m.impl("crop_concat_backward", &unet_fast::crop_concat_backward_cuda);
}
