// crop_concat on the CPU: one parallel pass over the output, each row (NCHW) or pixel (NHWC) copied
// from its source with memcpy or zero-filled. Byte copies, so one kernel serves every dtype.
#include "crop_concat.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

namespace unet_fast {
namespace {

// A source as raw bytes and element strides, ready for the inner loops.
struct RawSource {
  const char* data;
  int64_t channel_begin, channel_end, height, width, top, left;
  int64_t stride_n, stride_c, stride_h, stride_w;
};

// Sources must have a unit stride along the axis the output is contiguous in (W for NCHW, C for
// channels_last); channel slices of a gradient already do, anything else is made so once.
std::vector<RawSource> prepare(const std::vector<ShiftedSource>& sources, bool channels_last,
                               std::vector<at::Tensor>& keep_alive) {
  std::vector<RawSource> raw;
  for (const auto& s : sources) {
    at::Tensor t = s.src;
    const bool inner_ok =
        channels_last ? (t.stride(1) == 1 || t.size(1) == 1) : (t.stride(3) == 1 || t.size(3) == 1);
    if (!inner_ok) {
      t = t.contiguous(channels_last ? at::MemoryFormat::ChannelsLast
                                     : at::MemoryFormat::Contiguous);
    }
    keep_alive.push_back(t);
    raw.push_back({static_cast<const char*>(t.const_data_ptr()), s.channel_offset,
                   s.channel_offset + t.size(1), t.size(2), t.size(3), s.top, s.left, t.stride(0),
                   t.stride(1), t.stride(2), t.stride(3)});
  }
  return raw;
}

// Writes the W elements of one NCHW output row: the source row shifted right by `left`, zero
// elsewhere.
inline void copy_row(char* dst, const char* src, int64_t W, int64_t src_width, int64_t left,
                     int64_t es) {
  const int64_t begin = std::clamp<int64_t>(left, 0, W);
  const int64_t end = std::clamp<int64_t>(src_width + left, begin, W);
  if (begin > 0) std::memset(dst, 0, begin * es);
  std::memcpy(dst + begin * es, src + (begin - left) * es, (end - begin) * es);
  if (end < W) std::memset(dst + end * es, 0, (W - end) * es);
}

void shifted_concat_nchw(at::Tensor& dst, const std::vector<RawSource>& sources) {
  const int64_t C = dst.size(1), H = dst.size(2), W = dst.size(3), es = dst.element_size();
  char* out = static_cast<char*>(dst.data_ptr());
  // One task per (n, c) plane: the source and its offsets are fixed along a plane, so the rows
  // are plain memcpy/memset calls with no per-row index arithmetic.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(H * W, 1));
  at::parallel_for(0, dst.size(0) * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % C, n = plane / C;
      const RawSource* s = &sources[0];
      while (c >= s->channel_end) ++s;
      const char* src = s->data + (n * s->stride_n + (c - s->channel_begin) * s->stride_c) * es;
      char* dst_row = out + plane * H * W * es;
      const int64_t h_begin = std::clamp<int64_t>(s->top, 0, H);
      const int64_t h_end = std::clamp<int64_t>(s->height + s->top, h_begin, H);
      std::memset(dst_row, 0, h_begin * W * es);
      dst_row += h_begin * W * es;
      if (s->left == 0 && s->width == W && s->stride_h == W) {  // whole rows, dense: one copy
        std::memcpy(dst_row, src + (h_begin - s->top) * W * es, (h_end - h_begin) * W * es);
        dst_row += (h_end - h_begin) * W * es;
      } else {
        for (int64_t h = h_begin; h < h_end; ++h, dst_row += W * es) {
          copy_row(dst_row, src + (h - s->top) * s->stride_h * es, W, s->width, s->left, es);
        }
      }
      std::memset(dst_row, 0, (H - h_end) * W * es);
    }
  });
}

void shifted_concat_nhwc(at::Tensor& dst, const std::vector<RawSource>& sources) {
  const int64_t C = dst.size(1), H = dst.size(2), W = dst.size(3), es = dst.element_size();
  char* out = static_cast<char*>(dst.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(W * C, 1));
  at::parallel_for(0, dst.size(0) * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % H, n = row / H;
      for (const RawSource& s : sources) {
        const int64_t channels = s.channel_end - s.channel_begin, hs = h - s.top;
        char* dst_px = out + (row * W * C + s.channel_begin) * es;
        if (hs < 0 || hs >= s.height) {
          for (int64_t w = 0; w < W; ++w, dst_px += C * es) std::memset(dst_px, 0, channels * es);
          continue;
        }
        const char* src_row = s.data + (n * s.stride_n + hs * s.stride_h) * es;
        for (int64_t w = 0; w < W; ++w, dst_px += C * es) {
          const int64_t ws = w - s.left;
          if (ws >= 0 && ws < s.width) {
            std::memcpy(dst_px, src_row + ws * s.stride_w * es, channels * es);
          } else {
            std::memset(dst_px, 0, channels * es);
          }
        }
      }
    }
  });
}

// Fills dst (freshly allocated, dense in its memory format) from its shifted sources.
void shifted_concat(at::Tensor& dst, const std::vector<ShiftedSource>& sources) {
  // Dense in both formats (C == 1 or H == W == 1): the NCHW loop is right and simpler.
  const bool channels_last = !dst.is_contiguous();
  std::vector<at::Tensor> keep_alive;
  const auto raw = prepare(sources, channels_last, keep_alive);
  channels_last ? shifted_concat_nhwc(dst, raw) : shifted_concat_nchw(dst, raw);
}

at::Tensor crop_concat_cpu(const at::Tensor& skip, const at::Tensor& up, c10::IntArrayRef size) {
  return crop_concat_with(skip, up, size, shifted_concat);
}

std::tuple<at::Tensor, at::Tensor> crop_concat_backward_cpu(const at::Tensor& grad,
                                                            int64_t skip_channels,
                                                            c10::IntArrayRef skip_size,
                                                            c10::IntArrayRef up_size) {
  return crop_concat_backward_with(grad, skip_channels, skip_size, up_size, shifted_concat);
}

}  // namespace
}  // namespace unet_fast

TORCH_LIBRARY_IMPL(unet_fast, CPU, m) {
  m.impl("crop_concat", &unet_fast::crop_concat_cpu);
  m.impl("crop_concat_backward", &unet_fast::crop_concat_backward_cpu);
}
