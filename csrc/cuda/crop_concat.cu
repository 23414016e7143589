// crop_concat on CUDA, writing the output in its memory order without per-element division.
// NCHW: a block per (sample, channel) and rows of the plane, threads along W. NHWC: a block per
// output row (sample, h), threads across channels (lanes) and pixels; where every channel run
// is a multiple of 16 bytes, elements move as 16-byte vectors. Copies raw bits, so it is
// dtype-agnostic.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "crop_concat.h"

namespace unet_fast {
namespace {

constexpr int kThreads = 256;

// A source in units of T: channels [channel_begin, channel_end) of the output.
template <typename T>
struct DeviceSource {
  const T* data;
  int64_t channel_end, channel_begin, height, width, top, left;
  int64_t stride_n, stride_c, stride_h, stride_w;
};

template <typename T>
__device__ __forceinline__ T read(const DeviceSource<T>& s, int64_t n, int64_t c, int64_t h,
                                  int64_t w) {
  const int64_t hs = h - s.top, ws = w - s.left;
  if (hs < 0 || hs >= s.height || ws < 0 || ws >= s.width) return T{};  // zero bits: +0.0
  return s.data[n * s.stride_n + (c - s.channel_begin) * s.stride_c + hs * s.stride_h +
                ws * s.stride_w];
}

// grid (N * C, row blocks); `lanes` threads per row.
template <typename T>
__global__ void concat_nchw_kernel(T* __restrict__ dst, int64_t C, int64_t H, int64_t W, int lanes,
                                   DeviceSource<T> first, DeviceSource<T> second) {
  const int64_t plane = blockIdx.x, n = plane / C, c = plane % C;
  const int rows = kThreads / lanes, row = threadIdx.x / lanes, lane = threadIdx.x % lanes;
  if (row >= rows) return;
  const DeviceSource<T>& s = c < first.channel_end ? first : second;
  for (int64_t h = blockIdx.y * int64_t(rows) + row; h < H; h += int64_t(gridDim.y) * rows) {
    T* out = dst + (plane * H + h) * W;
    for (int64_t w = lane; w < W; w += lanes) out[w] = read(s, n, c, h, w);
  }
}

// grid (N * H, pixel blocks); `lanes` threads across channels, kThreads / lanes pixels at a time.
template <typename T>
__global__ void concat_nhwc_kernel(T* __restrict__ dst, int64_t C, int64_t H, int64_t W, int lanes,
                                   DeviceSource<T> first, DeviceSource<T> second) {
  const int64_t n = blockIdx.x / H, h = blockIdx.x % H;
  const int rows = kThreads / lanes, row = threadIdx.x / lanes, lane = threadIdx.x % lanes;
  if (row >= rows) return;
  T* out = dst + int64_t(blockIdx.x) * W * C;
  for (int64_t w = blockIdx.y * int64_t(rows) + row; w < W; w += int64_t(gridDim.y) * rows) {
    for (int64_t c = lane; c < C; c += lanes) {
      out[w * C + c] = c < first.channel_end ? read(first, n, c, h, w) : read(second, n, c, h, w);
    }
  }
}

// The source in units of T, `group` original elements each.
template <typename T>
DeviceSource<T> device_source(const ShiftedSource& s, int64_t group) {
  return {static_cast<const T*>(s.src.const_data_ptr()),
          (s.channel_offset + s.src.size(1)) / group,
          s.channel_offset / group,
          s.src.size(2),
          s.src.size(3),
          s.top,
          s.left,
          s.src.stride(0) / group,
          s.src.stride(1),
          s.src.stride(2) / group,
          s.src.stride(3) / group};
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
void launch(at::Tensor& dst, const ShiftedSource& first, const ShiftedSource& second,
            bool channels_last, int64_t group) {
  const int64_t N = dst.size(0), C = dst.size(1) / group, H = dst.size(2), W = dst.size(3);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto a = device_source<T>(first, group), b = device_source<T>(second, group);
  T* out = static_cast<T*>(dst.data_ptr());
  if (channels_last) {
    const int lanes = int(std::min<int64_t>(C, kThreads)), rows = kThreads / lanes;
    const dim3 grid(N * H, std::min<int64_t>(ceil_div(W, rows * 4), 65535));
    concat_nhwc_kernel<T><<<grid, kThreads, 0, stream>>>(out, C, H, W, lanes, a, b);
  } else {
    int lanes = 32;
    while (lanes < kThreads && lanes < W) lanes *= 2;
    const int rows = kThreads / lanes;
    const dim3 grid(N * C, std::min<int64_t>(ceil_div(H, rows * 4), 65535));
    concat_nchw_kernel<T><<<grid, kThreads, 0, stream>>>(out, C, H, W, lanes, a, b);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether every channel run (channel counts, pointers and non-channel strides) of a channels_last
// copy is a whole number of 16-byte vectors.
bool vectorisable(const at::Tensor& dst, const std::vector<ShiftedSource>& sources) {
  const int64_t group = 16 / dst.element_size();
  auto ok = [&](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 && t.size(1) % group == 0 &&
           t.stride(1) == 1 && t.stride(0) % group == 0 && t.stride(2) % group == 0 &&
           t.stride(3) % group == 0;
  };
  bool all = ok(dst);
  for (const auto& s : sources) all = all && ok(s.src) && s.channel_offset % group == 0;
  return all;
}

// Fills dst (freshly allocated, dense in its memory format) from one or two shifted sources.
void shifted_concat(at::Tensor& dst, const std::vector<ShiftedSource>& sources) {
  const c10::cuda::CUDAGuard guard(dst.device());
  TORCH_CHECK(
      dst.size(0) * std::max(dst.size(1), dst.size(2)) <= std::numeric_limits<int32_t>::max(),
      "crop_concat: output of shape ", dst.sizes(), " exceeds the CUDA grid");
  const ShiftedSource& first = sources.front();
  const ShiftedSource& second = sources.back();
  const bool channels_last = !dst.is_contiguous();
  if (channels_last && vectorisable(dst, sources)) {
    return launch<uint4>(dst, first, second, true, 16 / dst.element_size());
  }
  switch (dst.element_size()) {
    case 1:
      return launch<uint8_t>(dst, first, second, channels_last, 1);
    case 2:
      return launch<uint16_t>(dst, first, second, channels_last, 1);
    case 4:
      return launch<uint32_t>(dst, first, second, channels_last, 1);
    case 8:
      return launch<uint64_t>(dst, first, second, channels_last, 1);
    default:
      TORCH_CHECK(false, "crop_concat: unsupported element size ", dst.element_size());
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
