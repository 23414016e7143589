// BatchNorm (batch statistics) + ReLU on CUDA: per-channel sums (one block per channel and
// chunk, combined in float64), then one elementwise pass in the tensor's memory order, forward
// and backward; the eval-mode convolution (cuDNN) with the ReLU applied in place.
// Straightforward first kernels: correct for every layout and dtype, not yet tuned for NHWC.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace unet_fast {
namespace {

using Optional = std::optional<at::Tensor>;
constexpr int kThreads = 256;

// A dense activation viewed as (N, C, HW) with the strides of its memory format.
struct Layout {
  int64_t N, C, HW, stride_n, stride_c, stride_hw;
  bool channels_last;
};

Layout layout_of(const at::Tensor& y, bool channels_last) {
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  return channels_last ? Layout{N, C, HW, HW * C, 1, C, true} : Layout{N, C, HW, C * HW, HW, 1, false};
}

// Per channel and chunk: forward sums (y - shift, (y - shift)^2); backward sums (m dy,
// m dy (y - mean)) with m = [y scale + shift > 0]. coef: forward (C) shifts; backward (3, C).
template <typename scalar_t, typename acc_t, bool kBackward>
__global__ void channel_sums_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ dy,
                                    const acc_t* __restrict__ coef, acc_t* __restrict__ partial,
                                    Layout L, int64_t chunk) {
  const int64_t c = blockIdx.x, part = blockIdx.y, parts = gridDim.y;
  const int64_t count = L.N * L.HW;
  const int64_t begin = part * chunk, end = min(count, begin + chunk);
  acc_t a = 0, b = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t offset = (i / L.HW) * L.stride_n + c * L.stride_c + (i % L.HW) * L.stride_hw;
    const acc_t v = static_cast<acc_t>(y[offset]);
    if constexpr (kBackward) {
      const acc_t masked = v * coef[c] + coef[L.C + c] > acc_t(0) ? static_cast<acc_t>(dy[offset]) : acc_t(0);
      a += masked;
      b += masked * (v - coef[2 * L.C + c]);
    } else {
      const acc_t d = v - coef[c];
      a += d;
      b += d * d;
    }
  }
  __shared__ acc_t shared_a[kThreads], shared_b[kThreads];
  shared_a[threadIdx.x] = a;
  shared_b[threadIdx.x] = b;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      shared_a[threadIdx.x] += shared_a[threadIdx.x + s];
      shared_b[threadIdx.x] += shared_b[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    partial[c * parts + part] = shared_a[0];
    partial[(L.C + c) * parts + part] = shared_b[0];
  }
}

// Elementwise in memory order. coef (5, C): scale, shift, gain, slope, offset.
// Forward: relu(y scale + shift), NaN kept; backward: m dy gain + slope y + offset.
template <typename scalar_t, typename acc_t, bool kBackward>
__global__ void channel_map_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ y,
                                   const scalar_t* __restrict__ dy, const acc_t* __restrict__ coef,
                                   Layout L, int64_t numel) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel; i += step) {
    const int64_t c = L.channels_last ? i % L.C : (i / L.HW) % L.C;
    const acc_t v = static_cast<acc_t>(y[i]);
    const acc_t pre = v * coef[c] + coef[L.C + c];
    acc_t result;
    if constexpr (kBackward) {
      result = (pre > acc_t(0) ? static_cast<acc_t>(dy[i]) * coef[2 * L.C + c] : acc_t(0)) +
               coef[3 * L.C + c] * v + coef[4 * L.C + c];
    } else {
      result = (pre > acc_t(0) || pre != pre) ? pre : acc_t(0);
    }
    out[i] = static_cast<scalar_t>(result);
  }
}

void check_activation(const char* op, const at::Tensor& y) {
  TORCH_CHECK(y.dim() == 4, op, ": expected a 4-D (N, C, H, W) tensor, got shape ", y.sizes());
}

at::MemoryFormat format_of(const at::Tensor& y) { return y.suggest_memory_format(); }

// (C) or (K, C) float32/float64 sums of both kinds across chunks: (2, C) in float64.
template <bool kBackward>
at::Tensor channel_sums(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& coef,
                        const Layout& L) {
  const int64_t count = L.N * L.HW;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(64, count / (4 * kThreads)));
  const int64_t chunk = (count + parts - 1) / parts;
  at::Tensor partial = at::zeros({2, L.C, parts}, coef.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "channel_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    channel_sums_kernel<scalar_t, acc_t, kBackward>
        <<<dim3(L.C, parts), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), coef.const_data_ptr<acc_t>(),
            partial.data_ptr<acc_t>(), L, chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial.to(at::kDouble).sum(-1);
}

template <bool kBackward>
at::Tensor channel_map(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& coef,
                       const Layout& L) {
  at::Tensor out = at::empty_like(y);
  const int64_t numel = y.numel();
  if (numel == 0) return out;
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535LL * 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "channel_map", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    channel_map_kernel<scalar_t, acc_t, kBackward>
        <<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            out.data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
            coef.const_data_ptr<acc_t>(), L, numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor channel_param(const Optional& t, int64_t C, double fill, const at::TensorOptions& options) {
  return t.has_value() && t->defined() ? t->to(options.dtype()) : at::full({C}, fill, options);
}

// (scale, shift) in float64: relu(bn(y)) = relu(y * scale + shift).
std::pair<at::Tensor, at::Tensor> affine(const at::Tensor& mean, const at::Tensor& invstd,
                                         const Optional& weight, const Optional& bias) {
  const auto options = mean.options().dtype(at::kDouble);
  at::Tensor scale = channel_param(weight, mean.numel(), 1.0, options) * invstd.to(at::kDouble);
  at::Tensor shift = channel_param(bias, mean.numel(), 0.0, options) - mean.to(at::kDouble) * scale;
  return {scale, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cuda(
    const at::Tensor& y_in, const Optional& weight, const Optional& bias, double eps) {
  check_activation("batch_norm_relu", y_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const auto format = format_of(y_in);
  const at::Tensor y = y_in.contiguous(format);
  const Layout L = layout_of(y, format == at::MemoryFormat::ChannelsLast);
  const int64_t count = L.N * L.HW;
  TORCH_CHECK(count != 1, "Expected more than 1 value per channel when training, got input size ",
              y.sizes());
  const auto acc_type = at::toOpMathType(y.scalar_type());
  const auto stats = y.options().dtype(acc_type).memory_format(at::MemoryFormat::Contiguous);
  if (count == 0) {
    at::Tensor zeros = at::zeros({L.C}, stats);
    return {at::empty_like(y), zeros, zeros.clone(), zeros.clone()};
  }
  const at::Tensor first = y.select(0, 0).select(1, 0).select(1, 0).to(acc_type).contiguous();
  const at::Tensor sums = channel_sums<false>(y, y, first, L);
  const at::Tensor shifted_mean = sums[0] / count;
  const at::Tensor var = (sums[1] / count - shifted_mean * shifted_mean).clamp_min(0);
  const at::Tensor mean = first.to(at::kDouble) + shifted_mean;
  const at::Tensor invstd = (var + eps).rsqrt();
  auto [scale, shift] = affine(mean, invstd, weight, bias);
  const at::Tensor coef = at::stack({scale, shift}).to(acc_type).contiguous();
  return {channel_map<false>(y, y, coef, L), mean.to(acc_type), invstd.to(acc_type),
          (var * count / (count - 1)).to(acc_type)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& y_in, const Optional& weight,
    const Optional& bias, const at::Tensor& mean_in, const at::Tensor& invstd_in) {
  check_activation("batch_norm_relu_backward", y_in);
  TORCH_CHECK(grad_out.sizes() == y_in.sizes(), "batch_norm_relu_backward: grad_out of shape ",
              grad_out.sizes(), " does not match y of shape ", y_in.sizes());
  const c10::cuda::CUDAGuard guard(y_in.device());
  const auto format = format_of(y_in);
  const at::Tensor y = y_in.contiguous(format);
  const at::Tensor dy = grad_out.to(y.scalar_type()).contiguous(format);
  const Layout L = layout_of(y, format == at::MemoryFormat::ChannelsLast);
  const int64_t count = L.N * L.HW;
  const auto acc_type = at::toOpMathType(y.scalar_type());
  const at::Tensor mean = mean_in.to(at::kDouble), invstd = invstd_in.to(at::kDouble);
  auto [scale, shift] = affine(mean, invstd, weight, bias);
  const auto param_type = weight.has_value() && weight->defined() ? weight->scalar_type() : acc_type;
  if (count == 0) {
    at::Tensor zeros = at::zeros({L.C}, y.options().dtype(param_type));
    return {at::empty_like(y), zeros, zeros.clone()};
  }
  const at::Tensor sums = channel_sums<true>(
      y, dy, at::stack({scale, shift, mean}).to(acc_type).contiguous(), L);
  const at::Tensor slope = -scale * invstd * invstd * sums[1] / count;
  const at::Tensor offset = -scale * sums[0] / count - slope * mean;
  const at::Tensor coef = at::stack({scale, shift, scale, slope, offset}).to(acc_type).contiguous();
  return {channel_map<true>(y, dy, coef, L), (sums[1] * invstd).to(param_type),
          sums[0].to(param_type)};
}

at::Tensor batch_norm_relu_apply_cuda(const at::Tensor& y_in, const Optional& weight,
                                      const Optional& bias, const at::Tensor& mean,
                                      const at::Tensor& invstd) {
  check_activation("batch_norm_relu_apply", y_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const auto format = format_of(y_in);
  const at::Tensor y = y_in.contiguous(format);
  auto [scale, shift] = affine(mean, invstd, weight, bias);
  const at::Tensor coef = at::stack({scale, shift}).to(at::toOpMathType(y.scalar_type())).contiguous();
  return channel_map<false>(y, y, coef, layout_of(y, format == at::MemoryFormat::ChannelsLast));
}

// Eval mode: cuDNN convolution with the folded bias, then the ReLU in place.
at::Tensor conv_bias_relu_cuda(const at::Tensor& x, const at::Tensor& weight, const Optional& bias,
                               int64_t padding) {
  return at::convolution(x, weight, bias, {1, 1}, {padding, padding}, {1, 1}, false, {0, 0}, 1)
      .relu_()
      .contiguous(x.suggest_memory_format());
}

}  // namespace
}  // namespace unet_fast

TORCH_LIBRARY_IMPL(unet_fast, CUDA, m) {
  m.impl("batch_norm_relu", &unet_fast::batch_norm_relu_cuda);
  m.impl("batch_norm_relu_backward", &unet_fast::batch_norm_relu_backward_cuda);
  m.impl("batch_norm_relu_apply", &unet_fast::batch_norm_relu_apply_cuda);
  m.impl("conv_bias_relu", &unet_fast::conv_bias_relu_cuda);
}
