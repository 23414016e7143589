// BatchNorm (batch statistics) + ReLU on CUDA: per-channel sums, a one-thread-per-channel
// finalize (statistics and coefficients, combined in float64), then one elementwise pass.
// Forward and backward are three launches each. Activations are dense in their memory format:
// NHWC kernels give each thread a fixed group of channels (coefficients stay in registers), NCHW
// kernels a fixed plane; both use 16-byte vector accesses where channels (NHWC) or planes (NCHW)
// allow and compute no per-element division.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace unet_fast {
namespace {

using Optional = std::optional<at::Tensor>;
constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// A dense activation: N*HW pixels of C channels, NHWC or NCHW.
struct Layout {
  int64_t N, C, HW;
  bool channels_last;
};

// BatchNorm + ReLU as relu(y scale + shift), computed in float64 from the stored (rounded)
// statistics, so the forward, the recomputed activation and the backward's mask agree bit for bit.
template <typename acc_t>
__device__ __forceinline__ void affine(const acc_t* mean, const acc_t* invstd, const acc_t* weight,
                                       const acc_t* bias, int64_t c, acc_t& scale, acc_t& shift) {
  const double s = (weight ? double(weight[c]) : 1.0) * double(invstd[c]);
  scale = acc_t(s);
  shift = acc_t((bias ? double(bias[c]) : 0.0) - double(mean[c]) * s);
}

// Per-channel statistics of a whole activation, passed to the kernels by pointer.
template <typename acc_t>
struct Stats {
  const acc_t *mean, *invstd, *weight, *bias;  // weight, bias may be null (1, 0)
};

// Sums of a and b per channel (forward: a = y - y[0], b = a^2, the first sample's value as a
// shift that keeps the variance exact at any mean; backward: a = m dy, b = m dy (y - mean), with
// m the ReLU mask). partial: (2, C, parts).
template <typename scalar_t, typename acc_t, bool kBackward>
__device__ __forceinline__ void accumulate(acc_t v, acc_t d, acc_t shift_or_mean, acc_t scale,
                                           acc_t shift, acc_t& a, acc_t& b) {
  if constexpr (kBackward) {
    const acc_t masked = v * scale + shift <= acc_t(0) ? acc_t(0) : d;  // NaN passes, as F.relu
    a += masked;
    b += masked * (v - shift_or_mean);
  } else {
    const acc_t x = v - shift_or_mean;
    a += x;
    b += x * x;
  }
}

// Sums across `rows` threads that share a lane: values[row * lanes + lane], any row count.
template <typename acc_t>
__device__ void reduce_rows(acc_t* values, int row, int rows, int lanes, int lane, bool active) {
  for (int n = rows; n > 1;) {
    const int half = (n + 1) / 2;
    if (active && row < n - half) values[row * lanes + lane] += values[(row + half) * lanes + lane];
    n = half;
    __syncthreads();
  }
}

// NHWC: a block covers up to kThreads channel groups of VEC channels (lanes) and `rows` pixels
// at a time; grid (parts, channel blocks).
template <typename scalar_t, typename acc_t, int VEC, bool kBackward>
__global__ void sums_nhwc_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ dy,
                                 Stats<acc_t> stats, acc_t* __restrict__ partial, Layout L,
                                 int64_t chunk) {
  const int64_t groups = L.C / VEC, first_group = int64_t(blockIdx.y) * kThreads;
  const int lanes = int(groups - first_group < kThreads ? groups - first_group : kThreads),
            rows = kThreads / lanes;
  const int lane = threadIdx.x % lanes, row = threadIdx.x / lanes;
  const bool active = row < rows;
  const int64_t c0 = (first_group + lane) * VEC, count = L.N * L.HW;
  const int64_t part = blockIdx.x, begin = part * chunk, end = min(count, begin + chunk);
  acc_t a[VEC] = {}, b[VEC] = {}, center[VEC], scale[VEC] = {}, shift[VEC] = {};
  for (int k = 0; k < VEC; ++k) {
    if constexpr (kBackward) {
      affine(stats.mean, stats.invstd, stats.weight, stats.bias, c0 + k, scale[k], shift[k]);
      center[k] = stats.mean[c0 + k];
    } else {
      center[k] = acc_t(y[c0 + k]);
    }
  }
  if (active) {
    for (int64_t p = begin + row; p < end; p += rows) {
      const auto yv = *reinterpret_cast<const Vec<scalar_t, VEC>*>(y + p * L.C + c0);
      Vec<scalar_t, VEC> dv = yv;
      if constexpr (kBackward) dv = *reinterpret_cast<const Vec<scalar_t, VEC>*>(dy + p * L.C + c0);
      for (int k = 0; k < VEC; ++k)
        accumulate<scalar_t, acc_t, kBackward>(acc_t(yv.v[k]), acc_t(dv.v[k]), center[k], scale[k],
                                               shift[k], a[k], b[k]);
    }
  }
  __shared__ acc_t shared[kThreads];
  for (int k = 0; k < VEC; ++k) {
    for (int which = 0; which < 2; ++which) {
      if (active) shared[row * lanes + lane] = which == 0 ? a[k] : b[k];
      __syncthreads();
      reduce_rows(shared, row, rows, lanes, lane, active);
      if (row == 0) partial[(which * L.C + c0 + k) * gridDim.x + part] = shared[lane];
      __syncthreads();
    }
  }
}

// NCHW: a block sums one channel over a range of one sample's plane; grid (C, N * hw_parts).
template <typename scalar_t, typename acc_t, int VEC, bool kBackward>
__global__ void sums_nchw_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ dy,
                                 Stats<acc_t> stats, acc_t* __restrict__ partial, Layout L,
                                 int64_t hw_parts, int64_t chunk) {
  const int64_t c = blockIdx.x, part = blockIdx.y, n = part / hw_parts;
  const int64_t begin = (part % hw_parts) * chunk, end = min(L.HW, begin + chunk);
  const int64_t plane = (n * L.C + c) * L.HW;
  acc_t center, scale = 0, shift = 0, a = 0, b = 0;
  if constexpr (kBackward) {
    affine(stats.mean, stats.invstd, stats.weight, stats.bias, c, scale, shift);
    center = stats.mean[c];
  } else {
    center = acc_t(y[c * L.HW]);
  }
  for (int64_t i = begin + threadIdx.x * VEC; i < end; i += kThreads * VEC) {
    const auto yv = *reinterpret_cast<const Vec<scalar_t, VEC>*>(y + plane + i);
    Vec<scalar_t, VEC> dv = yv;
    if constexpr (kBackward) dv = *reinterpret_cast<const Vec<scalar_t, VEC>*>(dy + plane + i);
    for (int k = 0; k < VEC; ++k)
      accumulate<scalar_t, acc_t, kBackward>(acc_t(yv.v[k]), acc_t(dv.v[k]), center, scale, shift,
                                             a, b);
  }
  __shared__ acc_t shared[2][kThreads];
  shared[0][threadIdx.x] = a;
  shared[1][threadIdx.x] = b;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      shared[0][threadIdx.x] += shared[0][threadIdx.x + s];
      shared[1][threadIdx.x] += shared[1][threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    partial[c * gridDim.y + part] = shared[0][0];
    partial[(L.C + c) * gridDim.y + part] = shared[1][0];
  }
}

// The finalize kernels run one warp per channel (blockDim (32, kChannelsPerBlock)): the lanes sum
// the channel's partial sums in float64, lane 0 writes the results.
constexpr int kChannelsPerBlock = 8;

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums of both rows of partial (2, C, parts) for channel c, on lane 0.
template <typename acc_t>
__device__ __forceinline__ void combine(const acc_t* partial, int64_t C, int64_t parts, int64_t c,
                                        double& first, double& second) {
  first = second = 0;
  for (int64_t p = threadIdx.x; p < parts; p += 32) {
    first += partial[c * parts + p];
    second += partial[(C + c) * parts + p];
  }
  first = warp_sum(first);
  second = warp_sum(second);
}

// Forward statistics (mean, invstd, unbiased var) and (scale, shift).
template <typename scalar_t, typename acc_t>
__global__ void finalize_forward_kernel(const acc_t* __restrict__ partial, int64_t parts,
                                        const scalar_t* __restrict__ y, Layout L, double eps,
                                        const acc_t* weight, const acc_t* bias, acc_t* mean,
                                        acc_t* invstd, acc_t* var, acc_t* coef) {
  const int64_t c = blockIdx.x * int64_t(kChannelsPerBlock) + threadIdx.y;
  if (c >= L.C) return;
  double sum, squares;
  combine(partial, L.C, parts, c, sum, squares);
  if (threadIdx.x != 0) return;
  const double count = double(L.N * L.HW), shifted_mean = sum / count;
  const double biased = max(squares / count - shifted_mean * shifted_mean, 0.0);
  mean[c] = acc_t(double(y[L.channels_last ? c : c * L.HW]) + shifted_mean);
  invstd[c] = acc_t(1.0 / sqrt(biased + eps));
  var[c] = acc_t(biased * count / max(count - 1, 1.0));
  affine(mean, invstd, weight, bias, c, coef[c], coef[L.C + c]);
}

// Backward coefficients (scale, shift, gain, slope, offset) of grad_y = m dy gain + slope y +
// offset, and the parameter gradients.
template <typename acc_t>
__global__ void finalize_backward_kernel(const acc_t* __restrict__ partial, int64_t parts, Layout L,
                                         Stats<acc_t> stats, acc_t* coef, acc_t* grad_weight,
                                         acc_t* grad_bias) {
  const int64_t c = blockIdx.x * int64_t(kChannelsPerBlock) + threadIdx.y;
  if (c >= L.C) return;
  double sum, dot;
  combine(partial, L.C, parts, c, sum, dot);
  if (threadIdx.x != 0) return;
  const double count = double(L.N * L.HW), invstd = stats.invstd[c];
  const double gain = (stats.weight ? double(stats.weight[c]) : 1.0) * invstd;
  const double slope = -gain * invstd * invstd * dot / count;
  affine(stats.mean, stats.invstd, stats.weight, stats.bias, c, coef[c], coef[L.C + c]);
  coef[2 * L.C + c] = acc_t(gain);
  coef[3 * L.C + c] = acc_t(slope);
  coef[4 * L.C + c] = acc_t(-gain * sum / count - slope * double(stats.mean[c]));
  grad_weight[c] = acc_t(dot * invstd);
  grad_bias[c] = acc_t(sum);
}

// Forward relu(y scale + shift) (NaN kept, as F.relu); backward m dy gain + slope y + offset.
template <typename acc_t, bool kBackward>
__device__ __forceinline__ acc_t map_value(acc_t v, acc_t d, const acc_t* k) {
  const acc_t pre = v * k[0] + k[1];
  if constexpr (kBackward) return (pre <= acc_t(0) ? acc_t(0) : d * k[2]) + k[3] * v + k[4];
  return (pre > acc_t(0) || pre != pre) ? pre : acc_t(0);
}

constexpr int kCoefs = 5;

template <typename acc_t, bool kBackward>
__device__ __forceinline__ void load_coef(const acc_t* coef, int64_t C, int64_t c, acc_t* k) {
  for (int j = 0; j < (kBackward ? kCoefs : 2); ++j) k[j] = coef[j * C + c];
}

// NHWC: grid (pixel blocks, channel blocks), lanes and rows as in sums_nhwc_kernel.
template <typename scalar_t, typename acc_t, int VEC, bool kBackward>
__global__ void map_nhwc_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ y,
                                const scalar_t* __restrict__ dy, const acc_t* __restrict__ coef,
                                Layout L) {
  const int64_t groups = L.C / VEC, first_group = int64_t(blockIdx.y) * kThreads;
  const int lanes = int(groups - first_group < kThreads ? groups - first_group : kThreads),
            rows = kThreads / lanes;
  const int lane = threadIdx.x % lanes, row = threadIdx.x / lanes;
  if (row >= rows) return;
  const int64_t c0 = (first_group + lane) * VEC, pixels = L.N * L.HW;
  acc_t k[VEC][kCoefs];
  for (int j = 0; j < VEC; ++j) load_coef<acc_t, kBackward>(coef, L.C, c0 + j, k[j]);
  for (int64_t p = blockIdx.x * int64_t(rows) + row; p < pixels; p += int64_t(gridDim.x) * rows) {
    const auto yv = *reinterpret_cast<const Vec<scalar_t, VEC>*>(y + p * L.C + c0);
    Vec<scalar_t, VEC> dv = yv, result;
    if constexpr (kBackward) dv = *reinterpret_cast<const Vec<scalar_t, VEC>*>(dy + p * L.C + c0);
    for (int j = 0; j < VEC; ++j)
      result.v[j] = scalar_t(map_value<acc_t, kBackward>(acc_t(yv.v[j]), acc_t(dv.v[j]), k[j]));
    *reinterpret_cast<Vec<scalar_t, VEC>*>(out + p * L.C + c0) = result;
  }
}

// NCHW: grid (planes N*C, blocks along the plane).
template <typename scalar_t, typename acc_t, int VEC, bool kBackward>
__global__ void map_nchw_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ y,
                                const scalar_t* __restrict__ dy, const acc_t* __restrict__ coef,
                                Layout L) {
  const int64_t plane = blockIdx.x, base = plane * L.HW;
  acc_t k[kCoefs];
  load_coef<acc_t, kBackward>(coef, L.C, plane % L.C, k);
  for (int64_t i = (blockIdx.y * int64_t(kThreads) + threadIdx.x) * VEC; i < L.HW;
       i += int64_t(gridDim.y) * kThreads * VEC) {
    const auto yv = *reinterpret_cast<const Vec<scalar_t, VEC>*>(y + base + i);
    Vec<scalar_t, VEC> dv = yv, result;
    if constexpr (kBackward) dv = *reinterpret_cast<const Vec<scalar_t, VEC>*>(dy + base + i);
    for (int j = 0; j < VEC; ++j)
      result.v[j] = scalar_t(map_value<acc_t, kBackward>(acc_t(yv.v[j]), acc_t(dv.v[j]), k));
    *reinterpret_cast<Vec<scalar_t, VEC>*>(out + base + i) = result;
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// Calls body.template operator()<VEC>() with 16-byte vectors where every row of the contiguous
// dimension (channels in NHWC, planes in NCHW) holds whole vectors and the tensors are aligned.
template <typename scalar_t, typename Body>
void with_vector_width(const Layout& L, std::initializer_list<const at::Tensor*> tensors,
                       Body body) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  bool vectorise = (L.channels_last ? L.C : L.HW) % kVec == 0;
  for (const at::Tensor* t : tensors) vectorise = vectorise && aligned(*t);
  if (vectorise) {
    body.template operator()<kVec>();
  } else {
    body.template operator()<1>();
  }
}

const dim3 kFinalizeBlock(32, kChannelsPerBlock);

int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Launches the sums kernel for the layout: (2, C, parts) partial sums.
template <typename scalar_t, typename acc_t, bool kBackward>
at::Tensor channel_sums(const at::Tensor& y, const at::Tensor& dy, const Stats<acc_t>& stats,
                        const Layout& L) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  with_vector_width<scalar_t>(L, {&y, &dy}, [&]<int VEC>() {
    if (L.channels_last) {
      const int64_t groups = L.C / VEC, lanes = std::min<int64_t>(groups, kThreads);
      const int64_t pixels = L.N * L.HW, rows = kThreads / lanes;
      const int64_t parts = std::clamp<int64_t>(ceil_div(pixels, rows * 16), 1, 4 * sm_count());
      partial = at::empty({2, L.C, parts}, y.options().dtype(c10::CppTypeToScalarType<acc_t>()));
      sums_nhwc_kernel<scalar_t, acc_t, VEC, kBackward>
          <<<dim3(parts, ceil_div(groups, kThreads)), kThreads, 0, stream>>>(
              y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), stats,
              partial.mutable_data_ptr<acc_t>(), L, ceil_div(pixels, parts));
    } else {
      const int64_t hw_parts = std::clamp<int64_t>(ceil_div(L.HW, kThreads * VEC * 8), 1,
                                                   std::max<int64_t>(1, 64 / L.N));
      const int64_t chunk = ceil_div(ceil_div(L.HW, hw_parts), VEC) * VEC;
      partial =
          at::empty({2, L.C, L.N * hw_parts}, y.options().dtype(c10::CppTypeToScalarType<acc_t>()));
      sums_nchw_kernel<scalar_t, acc_t, VEC, kBackward>
          <<<dim3(L.C, L.N * hw_parts), kThreads, 0, stream>>>(
              y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(), stats,
              partial.mutable_data_ptr<acc_t>(), L, hw_parts, chunk);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial;
}

template <typename scalar_t, typename acc_t, bool kBackward>
at::Tensor channel_map(const at::Tensor& y, const at::Tensor& dy, const acc_t* coef,
                       const Layout& L) {
  at::Tensor out = at::empty_like(y);
  if (y.numel() == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_vector_width<scalar_t>(L, {&y, &dy, &out}, [&]<int VEC>() {
    if (L.channels_last) {
      const int64_t groups = L.C / VEC, rows = kThreads / std::min<int64_t>(groups, kThreads);
      const int64_t blocks = std::min<int64_t>(ceil_div(L.N * L.HW, rows), 16 * sm_count());
      map_nhwc_kernel<scalar_t, acc_t, VEC, kBackward>
          <<<dim3(blocks, ceil_div(groups, kThreads)), kThreads, 0, stream>>>(
              out.mutable_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
              dy.const_data_ptr<scalar_t>(), coef, L);
    } else {
      const int64_t blocks = std::min<int64_t>(ceil_div(L.HW, kThreads * VEC), 65535);
      map_nchw_kernel<scalar_t, acc_t, VEC, kBackward>
          <<<dim3(L.N * L.C, blocks), kThreads, 0, stream>>>(
              out.mutable_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
              dy.const_data_ptr<scalar_t>(), coef, L);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void check_activation(const char* op, const at::Tensor& y) {
  TORCH_CHECK(y.dim() == 4, op, ": expected a 4-D (N, C, H, W) tensor, got shape ", y.sizes());
  TORCH_CHECK(y.size(0) * y.size(1) <= std::numeric_limits<int32_t>::max(), op,
              ": N * C must fit the grid, got shape ", y.sizes());
}

Layout layout_of(const at::Tensor& y) {
  return {y.size(0), y.size(1), y.size(2) * y.size(3),
          y.suggest_memory_format() == at::MemoryFormat::ChannelsLast};
}

// A (C) parameter as a contiguous acc_t tensor (undefined stays undefined: a null pointer).
at::Tensor as_acc(const Optional& t, at::ScalarType acc_type) {
  return t.has_value() && t->defined() ? t->to(acc_type).contiguous() : at::Tensor();
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cuda(
    const at::Tensor& y_in, const Optional& weight_in, const Optional& bias_in, double eps) {
  check_activation("batch_norm_relu", y_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous(y_in.suggest_memory_format());
  const Layout L = layout_of(y);
  TORCH_CHECK(L.N * L.HW != 1,
              "Expected more than 1 value per channel when training, got input size ", y.sizes());
  const auto options = y.options()
                           .dtype(at::toOpMathType(y.scalar_type()))
                           .memory_format(at::MemoryFormat::Contiguous);
  // separate tensors: a custom op's outputs must not alias each other
  at::Tensor mean = at::zeros({L.C}, options), invstd = at::zeros({L.C}, options),
             var = at::zeros({L.C}, options), coef = at::empty({2, L.C}, options);
  if (L.N * L.HW == 0) return {at::empty_like(y), mean, invstd, var};
  const at::Tensor weight = as_acc(weight_in, options.dtype().toScalarType());
  const at::Tensor bias = as_acc(bias_in, options.dtype().toScalarType());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "batch_norm_relu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const at::Tensor partial = channel_sums<scalar_t, acc_t, false>(y, y, {}, L);
        finalize_forward_kernel<scalar_t, acc_t><<<ceil_div(L.C, kChannelsPerBlock), kFinalizeBlock,
                                                   0, at::cuda::getCurrentCUDAStream()>>>(
            partial.const_data_ptr<acc_t>(), partial.size(2), y.const_data_ptr<scalar_t>(), L, eps,
            ptr_or_null<acc_t>(weight), ptr_or_null<acc_t>(bias), mean.mutable_data_ptr<acc_t>(),
            invstd.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(),
            coef.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        out = channel_map<scalar_t, acc_t, false>(y, y, coef.const_data_ptr<acc_t>(), L);
      });
  return {out, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& y_in, const Optional& weight_in,
    const Optional& bias_in, const at::Tensor& mean_in, const at::Tensor& invstd_in) {
  check_activation("batch_norm_relu_backward", y_in);
  TORCH_CHECK(grad_out.sizes() == y_in.sizes(), "batch_norm_relu_backward: grad_out of shape ",
              grad_out.sizes(), " does not match y of shape ", y_in.sizes());
  const c10::cuda::CUDAGuard guard(y_in.device());
  const auto format = y_in.suggest_memory_format();
  const at::Tensor y = y_in.contiguous(format);
  const at::Tensor dy = grad_out.to(y.scalar_type()).contiguous(format);
  const Layout L = layout_of(y);
  const auto acc_type = at::toOpMathType(y.scalar_type());
  const auto param_type =
      weight_in.has_value() && weight_in->defined() ? weight_in->scalar_type() : acc_type;
  const at::Tensor weight = as_acc(weight_in, acc_type), bias = as_acc(bias_in, acc_type);
  const at::Tensor mean = mean_in.to(acc_type).contiguous(),
                   invstd = invstd_in.to(acc_type).contiguous();
  at::Tensor coef = at::empty({5, L.C}, mean.options());
  at::Tensor grad_weight = at::zeros({L.C}, mean.options()),
             grad_bias = at::zeros({L.C}, mean.options());
  if (L.N * L.HW == 0)
    return {at::empty_like(y), grad_weight.to(param_type), grad_bias.to(param_type)};
  at::Tensor grad_y;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "batch_norm_relu_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Stats<acc_t> stats{mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                                 ptr_or_null<acc_t>(weight), ptr_or_null<acc_t>(bias)};
        const at::Tensor partial = channel_sums<scalar_t, acc_t, true>(y, dy, stats, L);
        finalize_backward_kernel<acc_t><<<ceil_div(L.C, kChannelsPerBlock), kFinalizeBlock, 0,
                                          at::cuda::getCurrentCUDAStream()>>>(
            partial.const_data_ptr<acc_t>(), partial.size(2), L, stats,
            coef.mutable_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<acc_t>(),
            grad_bias.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        grad_y = channel_map<scalar_t, acc_t, true>(y, dy, coef.const_data_ptr<acc_t>(), L);
      });
  return {grad_y, grad_weight.to(param_type), grad_bias.to(param_type)};
}

// One thread per channel: (scale, shift) from given statistics.
template <typename acc_t>
__global__ void affine_kernel(Stats<acc_t> stats, int64_t C, acc_t* coef) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c < C) affine(stats.mean, stats.invstd, stats.weight, stats.bias, c, coef[c], coef[C + c]);
}

at::Tensor batch_norm_relu_apply_cuda(const at::Tensor& y_in, const Optional& weight_in,
                                      const Optional& bias_in, const at::Tensor& mean_in,
                                      const at::Tensor& invstd_in) {
  check_activation("batch_norm_relu_apply", y_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = y_in.contiguous(y_in.suggest_memory_format());
  const Layout L = layout_of(y);
  const auto acc_type = at::toOpMathType(y.scalar_type());
  const at::Tensor weight = as_acc(weight_in, acc_type), bias = as_acc(bias_in, acc_type);
  const at::Tensor mean = mean_in.to(acc_type).contiguous(),
                   invstd = invstd_in.to(acc_type).contiguous();
  at::Tensor coef = at::empty({2, L.C}, mean.options()), out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "batch_norm_relu_apply", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        affine_kernel<acc_t>
            <<<ceil_div(L.C, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                {mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                 ptr_or_null<acc_t>(weight), ptr_or_null<acc_t>(bias)},
                L.C, coef.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        out = channel_map<scalar_t, acc_t, false>(y, y, coef.const_data_ptr<acc_t>(), L);
      });
  return out;
}

}  // namespace
}  // namespace unet_fast

TORCH_LIBRARY_IMPL(unet_fast, CUDA, m) {
  m.impl("batch_norm_relu", &unet_fast::batch_norm_relu_cuda);
  m.impl("batch_norm_relu_backward", &unet_fast::batch_norm_relu_backward_cuda);
  m.impl("batch_norm_relu_apply", &unet_fast::batch_norm_relu_apply_cuda);
}
