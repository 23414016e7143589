// Norm + activation on CUDA, fused: the CPU kernel's algorithm (csrc/cpu/norm_act.cpp) for 2-D
// and 3-D activations in channels-first or channels-last layout. BatchNorm (statistics per
// channel over the batch) or GroupNorm (per sample and group; InstanceNorm is one channel per
// group), then ReLU, LeakyReLU, PReLU or nothing.
//
// Every pass gives each thread the values of one (sample, channel) plane, so the plane's
// coefficients are computed once and no element needs a division: channels-first blocks cover a
// part of one plane, channels-last blocks `lanes` consecutive channels (one per lane, coalesced)
// over a part of one sample's pixels. Sum passes write one partial per block and plane, reduced in
// float64 in a fixed order (deterministic); one thread per unit (a channel for BatchNorm, a
// (sample, group) for GroupNorm) or per channel finishes the statistics or the gradients'
// coefficients. Forward: sums, reduce, finish, apply. Backward: sums, reduce, finish, gradient.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "norm_act.h"

namespace unet_fast {
namespace {

using Optional = std::optional<at::Tensor>;
constexpr int kThreads = 256;
constexpr int64_t kPerThread = 16;  // values a thread sums in acc_t before the block's tree

// Stats: sums of y - shift and its square; GradSums: of the masked gradient gz, gz * (y - mean)
// and (PReLU) the pre-activation times grad where it is not > 0; Apply: the output; Grad: grad_y.
enum Pass : int { kStats, kGradSums, kApply, kGrad };

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A dense (N, C, S) activation, S = H*W or D*H*W, and its statistics' units.
struct Layout {
  int64_t N, C, S, groups;  // groups 0: BatchNorm
  bool channels_last;
  __host__ __device__ int64_t planes() const { return N * C; }
  __host__ __device__ int64_t units() const { return groups ? N * groups : C; }
  __host__ __device__ int64_t unit_of(int64_t n, int64_t c) const {
    return groups ? n * groups + c / (C / groups) : c;
  }
  __host__ __device__ int64_t count() const { return groups ? (C / groups) * S : N * S; }
  __host__ __device__ int64_t offset(int64_t n, int64_t c, int64_t s) const {
    return channels_last ? (n * S + s) * C + c : (n * C + c) * S + s;
  }
};

// Per-unit statistics and backward coefficients, per-channel affine parameters and slopes
// (LeakyReLU's slope or PReLU's weights; 0 unused), all in acc_t; null where absent.
template <typename acc_t>
struct Params {
  const acc_t *mean, *invstd, *gamma, *beta, *slopes, *coef_a, *coef_b;
  Act act;
};

// One plane's coefficients: the pre-activation is (y - mean) * scale + beta (centred, so that a
// tiny variance's huge scale cancels nothing); the Stats pass's `mean` is the unit's first value.
template <typename acc_t>
struct Plane {
  acc_t mean, scale, beta, slope, a, b;
};

template <Pass kPass, typename scalar_t, typename acc_t>
__device__ Plane<acc_t> plane_of(const Params<acc_t>& p, const Layout& L, const scalar_t* y,
                                 int64_t n, int64_t c) {
  Plane<acc_t> k{};
  if constexpr (kPass == kStats) {
    const int64_t first_c = L.groups ? (c / (L.C / L.groups)) * (L.C / L.groups) : c;
    k.mean = acc_t(y[L.offset(L.groups ? n : 0, first_c, 0)]);
    return k;
  } else {
    const int64_t u = L.unit_of(n, c);
    k.mean = p.mean[u];
    k.scale = acc_t((p.gamma ? double(p.gamma[c]) : 1.0) * double(p.invstd[u]));
    k.beta = p.beta ? p.beta[c] : acc_t(0);
    k.slope = p.slopes[c];
    if constexpr (kPass == kGrad) k.a = p.coef_a[u], k.b = p.coef_b[u];
    return k;
  }
}

// F.relu (NaN passes), F.leaky_relu / F.prelu, identity; and the masks their gradients apply
// (ReLU's passes unless a <= 0, so NaN passes it).
template <typename T>
__device__ __forceinline__ T activate(Act act, T a, T slope) {
  if (act == Act::kIdentity) return a;
  if (act == Act::kRelu) return (a > T(0) || a != a) ? a : T(0);
  return a > T(0) ? a : a * slope;
}
template <typename T>
__device__ __forceinline__ T mask(Act act, T a, T d, T slope) {
  if (act == Act::kIdentity) return d;
  if (act == Act::kRelu) return a <= T(0) ? T(0) : d;
  return a > T(0) ? d : d * slope;
}

template <Pass kPass, typename acc_t>
__device__ __forceinline__ void add_terms(const Plane<acc_t>& k, Act act, acc_t v, acc_t d,
                                          acc_t (&s)[3]) {
  if constexpr (kPass == kStats) {
    const acc_t x = v - k.mean;
    s[0] += x;
    s[1] += x * x;
  } else {
    const acc_t centred = v - k.mean, pre = centred * k.scale + k.beta;
    const acc_t masked = mask(act, pre, d, k.slope);
    s[0] += masked;
    s[1] += masked * centred;
    if (act == Act::kPrelu && !(pre > acc_t(0))) s[2] += pre * d;
  }
}

template <Pass kPass, typename acc_t>
__device__ __forceinline__ acc_t map_value(const Plane<acc_t>& k, Act act, acc_t v, acc_t d) {
  const acc_t centred = v - k.mean, pre = centred * k.scale + k.beta;
  if constexpr (kPass == kApply) return activate(act, pre, k.slope);
  return mask(act, pre, d, k.slope) * k.scale + centred * k.a + k.b;
}

// Tree sum over the threads that share a lane: values[k][row * lanes + lane], rows a power of 2.
template <typename acc_t>
__device__ void reduce_rows(acc_t (&values)[3][kThreads], int row, int rows, int lanes) {
  for (int half = rows / 2; half > 0; half /= 2) {
    if (row < half)
      for (int k = 0; k < 3; ++k) values[k][threadIdx.x] += values[k][threadIdx.x + half * lanes];
    __syncthreads();
  }
}

// Channels-first sums: grid (planes, parts), a block sums `chunk` values of one plane;
// partial: (3, planes, parts).
template <Pass kPass, typename scalar_t, typename acc_t>
__global__ void sums_nchw_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ dy,
                                 Params<acc_t> p, Layout L, int64_t chunk,
                                 acc_t* __restrict__ partial) {
  const int64_t plane = blockIdx.x, part = blockIdx.y, parts = gridDim.y;
  const Plane<acc_t> k = plane_of<kPass, scalar_t, acc_t>(p, L, y, plane / L.C, plane % L.C);
  const int64_t base = plane * L.S, end = min(L.S, (part + 1) * chunk);
  acc_t s[3] = {};
  for (int64_t i = part * chunk + threadIdx.x; i < end; i += kThreads)
    add_terms<kPass>(k, p.act, acc_t(y[base + i]), dy ? acc_t(dy[base + i]) : acc_t(0), s);
  __shared__ acc_t shared[3][kThreads];
  for (int j = 0; j < 3; ++j) shared[j][threadIdx.x] = s[j];
  __syncthreads();
  reduce_rows(shared, threadIdx.x, kThreads, 1);
  if (threadIdx.x == 0)
    for (int j = 0; j < 3; ++j) partial[(j * L.planes() + plane) * parts + part] = shared[j][0];
}

// Channels-last sums: grid (parts, N, channel blocks); `lanes` channels (a power of 2 up to 32)
// by kThreads / lanes rows of pixels.
template <Pass kPass, typename scalar_t, typename acc_t>
__global__ void sums_nhwc_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ dy,
                                 Params<acc_t> p, Layout L, int lanes, int64_t chunk,
                                 acc_t* __restrict__ partial) {
  const int lane = threadIdx.x % lanes, row = threadIdx.x / lanes, rows = kThreads / lanes;
  const int64_t part = blockIdx.x, parts = gridDim.x, n = blockIdx.y;
  const int64_t c = int64_t(blockIdx.z) * lanes + lane;
  acc_t s[3] = {};
  if (c < L.C) {
    const Plane<acc_t> k = plane_of<kPass, scalar_t, acc_t>(p, L, y, n, c);
    const int64_t end = min(L.S, (part + 1) * chunk);
    for (int64_t px = part * chunk + row; px < end; px += rows) {
      const int64_t i = L.offset(n, c, px);
      add_terms<kPass>(k, p.act, acc_t(y[i]), dy ? acc_t(dy[i]) : acc_t(0), s);
    }
  }
  __shared__ acc_t shared[3][kThreads];
  for (int j = 0; j < 3; ++j) shared[j][threadIdx.x] = s[j];
  __syncthreads();
  reduce_rows(shared, row, rows, lanes);
  if (row == 0 && c < L.C)
    for (int j = 0; j < 3; ++j)
      partial[(j * L.planes() + n * L.C + c) * parts + part] = shared[j][lane];
}

// out = the pass's value per element, grids as the sums kernels'.
template <Pass kPass, typename scalar_t, typename acc_t>
__global__ void map_nchw_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ y,
                                const scalar_t* __restrict__ dy, Params<acc_t> p, Layout L,
                                int64_t chunk) {
  const int64_t plane = blockIdx.x, part = blockIdx.y;
  const Plane<acc_t> k = plane_of<kPass, scalar_t, acc_t>(p, L, y, plane / L.C, plane % L.C);
  const int64_t base = plane * L.S, end = min(L.S, (part + 1) * chunk);
  for (int64_t i = part * chunk + threadIdx.x; i < end; i += kThreads)
    out[base + i] = scalar_t(
        map_value<kPass>(k, p.act, acc_t(y[base + i]), dy ? acc_t(dy[base + i]) : acc_t(0)));
}

template <Pass kPass, typename scalar_t, typename acc_t>
__global__ void map_nhwc_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ y,
                                const scalar_t* __restrict__ dy, Params<acc_t> p, Layout L,
                                int lanes, int64_t chunk) {
  const int lane = threadIdx.x % lanes, row = threadIdx.x / lanes, rows = kThreads / lanes;
  const int64_t part = blockIdx.x, n = blockIdx.y, c = int64_t(blockIdx.z) * lanes + lane;
  if (c >= L.C) return;
  const Plane<acc_t> k = plane_of<kPass, scalar_t, acc_t>(p, L, y, n, c);
  const int64_t end = min(L.S, (part + 1) * chunk);
  for (int64_t px = part * chunk + row; px < end; px += rows) {
    const int64_t i = L.offset(n, c, px);
    out[i] = scalar_t(map_value<kPass>(k, p.act, acc_t(y[i]), dy ? acc_t(dy[i]) : acc_t(0)));
  }
}

// totals[i] = the sum of partial[i, :] in float64, i over (3, planes): one block each.
template <typename acc_t>
__global__ void reduce_parts_kernel(const acc_t* __restrict__ partial, int64_t parts,
                                    double* __restrict__ totals) {
  double s = 0;
  for (int64_t j = threadIdx.x; j < parts; j += kThreads)
    s += double(partial[blockIdx.x * parts + j]);
  __shared__ double shared[kThreads];
  shared[threadIdx.x] = s;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) totals[blockIdx.x] = shared[0];
}

// The planes (n, c) of a unit: BatchNorm's channel over the batch, GroupNorm's group's channels.
template <typename Fn>
__device__ void for_unit_planes(const Layout& L, int64_t u, Fn fn) {
  if (!L.groups) {
    for (int64_t n = 0; n < L.N; ++n) fn(n, u);
    return;
  }
  const int64_t n = u / L.groups, size = L.C / L.groups, first = (u % L.groups) * size;
  for (int64_t c = first; c < first + size; ++c) fn(n, c);
}

// Mean, 1/sqrt(var + eps) and the unbiased variance (NaN for one value) per unit from the
// shifted sums; a NaN variance stays NaN (no fmax).
template <typename scalar_t, typename acc_t>
__global__ void finish_stats_kernel(const double* __restrict__ totals,
                                    const scalar_t* __restrict__ y, Layout L, double eps,
                                    acc_t* mean, acc_t* invstd, acc_t* unbiased_var) {
  const int64_t u = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (u >= L.units()) return;
  double sum = 0, sum_sq = 0;
  int64_t first_n = 0, first_c = -1;
  for_unit_planes(L, u, [&](int64_t n, int64_t c) {
    if (first_c < 0) first_n = n, first_c = c;
    sum += totals[n * L.C + c];
    sum_sq += totals[L.planes() + n * L.C + c];
  });
  const double count = double(L.count()), shifted_mean = sum / count;
  double var = sum_sq / count - shifted_mean * shifted_mean;
  var = var < 0 ? 0.0 : var;
  mean[u] = acc_t(double(acc_t(y[L.offset(first_n, first_c, 0)])) + shifted_mean);
  invstd[u] = acc_t(1.0 / sqrt(var + eps));
  unbiased_var[u] = acc_t(count > 1 ? var * count / (count - 1) : NAN);
}

// grad_y = gain * gz + a * (y - mean) + b with a = -invstd^3 * sum(gamma gz (y - mean)) / count
// and b = -invstd * sum(gamma gz) / count over the unit; one thread per unit.
template <typename acc_t>
__global__ void finish_grad_units_kernel(const double* __restrict__ totals, Params<acc_t> p,
                                         Layout L, acc_t* coef_a, acc_t* coef_b) {
  const int64_t u = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (u >= L.units()) return;
  double dy = 0, dy_xmu = 0;
  for_unit_planes(L, u, [&](int64_t n, int64_t c) {
    const double gamma = p.gamma ? double(p.gamma[c]) : 1.0;
    dy += gamma * totals[n * L.C + c];
    dy_xmu += gamma * totals[L.planes() + n * L.C + c];
  });
  const double inv = p.invstd[u], count = double(L.count());
  coef_a[u] = acc_t(-inv * inv * inv * dy_xmu / count);
  coef_b[u] = acc_t(-inv * dy / count);
}

// The per-channel gradients of gamma, beta and PReLU's slopes; one thread per channel.
template <typename acc_t>
__global__ void finish_grad_channels_kernel(const double* __restrict__ totals, Params<acc_t> p,
                                            Layout L, double* grad_weight, double* grad_bias,
                                            double* grad_slope) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= L.C) return;
  double gw = 0, gb = 0, gs = 0;
  for (int64_t n = 0; n < L.N; ++n) {
    const int64_t plane = n * L.C + c;
    gb += totals[plane];
    gw += totals[L.planes() + plane] * double(p.invstd[L.unit_of(n, c)]);
    gs += totals[2 * L.planes() + plane];
  }
  grad_weight[c] = gw, grad_bias[c] = gb, grad_slope[c] = gs;
}

// Channels per channels-last block: all of them up to 32, rounded up to a power of 2.
int lanes_for(int64_t C) {
  int lanes = 1;
  while (lanes < 32 && lanes < C) lanes *= 2;
  return lanes;
}

// The sums of a pass per plane, reduced in float64: (3, planes).
template <Pass kPass, typename scalar_t, typename acc_t>
at::Tensor plane_sums(const Layout& L, const at::Tensor& y, const scalar_t* dy,
                      const Params<acc_t>& p) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_options = y.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  at::Tensor partial;
  int64_t parts;
  if (!L.channels_last) {
    // at most 65535 parts (gridDim.y), whole multiples of the block
    const int64_t chunk =
        ceil_div(std::max(kThreads * kPerThread, ceil_div(L.S, 65535)), kThreads) * kThreads;
    parts = ceil_div(L.S, chunk);
    partial = at::empty({3 * L.planes() * parts}, acc_options);
    sums_nchw_kernel<kPass, scalar_t, acc_t><<<dim3(L.planes(), parts), kThreads, 0, stream>>>(
        yp, dy, p, L, chunk, partial.data_ptr<acc_t>());
  } else {
    const int lanes = lanes_for(L.C);
    const int64_t chunk = (kThreads / lanes) * kPerThread * 4;
    parts = ceil_div(L.S, chunk);
    partial = at::empty({3 * L.planes() * parts}, acc_options);
    sums_nhwc_kernel<kPass, scalar_t, acc_t>
        <<<dim3(parts, L.N, ceil_div(L.C, lanes)), kThreads, 0, stream>>>(
            yp, dy, p, L, lanes, chunk, partial.data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor totals = at::empty({3, L.planes()}, y.options().dtype(at::kDouble));
  reduce_parts_kernel<acc_t><<<3 * L.planes(), kThreads, 0, stream>>>(
      partial.const_data_ptr<acc_t>(), parts, totals.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return totals;
}

template <Pass kPass, typename scalar_t, typename acc_t>
void map(const Layout& L, at::Tensor& out, const at::Tensor& y, const scalar_t* dy,
         const Params<acc_t>& p) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  if (!L.channels_last) {
    const int64_t chunk =
        ceil_div(std::max(kThreads * kPerThread, ceil_div(L.S, 65535)), kThreads) * kThreads;
    map_nchw_kernel<kPass, scalar_t, acc_t>
        <<<dim3(L.planes(), ceil_div(L.S, chunk)), kThreads, 0, stream>>>(op, yp, dy, p, L, chunk);
  } else {
    const int lanes = lanes_for(L.C);
    const int64_t chunk = (kThreads / lanes) * kPerThread * 4;
    map_nhwc_kernel<kPass, scalar_t, acc_t>
        <<<dim3(ceil_div(L.S, chunk), L.N, ceil_div(L.C, lanes)), kThreads, 0, stream>>>(
            op, yp, dy, p, L, lanes, chunk);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Layout layout_of(const char* op, const at::Tensor& y, int64_t groups) {
  TORCH_CHECK(y.is_cuda(), op, ": expected a CUDA tensor");
  TORCH_CHECK(y.dim() == 4 || y.dim() == 5, op,
              ": expected a 4-D (N, C, H, W) or 5-D (N, C, D, H, W) tensor, got shape ", y.sizes());
  const int64_t C = y.size(1);
  TORCH_CHECK(groups >= 0 && (groups == 0 || (C > 0 && C % groups == 0)), op, ": ", C,
              " channels cannot be split into ", groups, " groups");
  TORCH_CHECK(y.size(0) <= 65535, op, ": at most 65535 samples per call, got ", y.size(0));
  const auto format = y.suggest_memory_format();
  return {y.size(0), C, y.numel() / std::max<int64_t>(y.size(0) * C, 1), groups,
          format == at::MemoryFormat::ChannelsLast || format == at::MemoryFormat::ChannelsLast3d};
}

// A per-channel vector in acc_t on y's device (undefined when absent), its size checked.
at::Tensor channel_vector(const char* op, const char* name, const Optional& t, const at::Tensor& y,
                          at::ScalarType acc) {
  if (!defined(t)) return {};
  TORCH_CHECK(t->numel() == y.size(1), op, ": ", name, " must have ", y.size(1), " elements, got ",
              t->numel());
  TORCH_CHECK(t->device() == y.device(), op, ": ", name, " is on ", t->device(), ", y on ",
              y.device());
  return t->to(acc).contiguous();
}

// The kernels' parameters; the tensors must outlive the launches.
struct Inputs {
  at::Tensor y, gamma, beta, slopes;
  Layout L;
  Act act;
  Inputs(const char* op, const at::Tensor& y_in, int64_t groups, const Optional& weight,
         const Optional& bias, c10::string_view act_name, double slope, const Optional& act_weight)
      : y(y_in.contiguous(y_in.suggest_memory_format())),
        L(layout_of(op, y, groups)),
        act(parse_act(std::string(act_name))) {
    const auto acc = at::toOpMathType(y.scalar_type());
    gamma = channel_vector(op, "weight", weight, y, acc);
    beta = channel_vector(op, "bias", bias, y, acc);
    slopes = channel_slopes(op, act, slope, act_weight, y.size(1), y.options().dtype(acc));
  }
  template <typename acc_t>
  Params<acc_t> params(const at::Tensor& mean, const at::Tensor& invstd) const {
    auto ptr = [](const at::Tensor& t) {
      return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
    };
    return {ptr(mean), ptr(invstd), ptr(gamma), ptr(beta), ptr(slopes), nullptr, nullptr, act};
  }
};

// Per-unit statistics as the kernels take them: acc_t, on y's device, one per unit.
at::Tensor unit_stats(const char* op, const at::Tensor& t, const Inputs& in) {
  TORCH_CHECK(t.numel() == in.L.units(), op, ": expected ", in.L.units(), " statistics, got ",
              t.numel());
  return t.to(in.y.device(), at::toOpMathType(in.y.scalar_type())).contiguous();
}

void check_dtype(const char* op, const at::Tensor& y) {
  TORCH_CHECK(at::isFloatingType(y.scalar_type()), op,
              ": expected float32, float64, bfloat16 or float16, got ", y.scalar_type());
}

// Statistics of y (dense in its memory format) and act(norm(y)) into out (y itself in place):
// (mean, invstd, unbiased_var).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_into(const Inputs& in, at::Tensor& out,
                                                             double eps) {
  const Layout& L = in.L;
  TORCH_CHECK(L.groups != 0 || L.count() != 1,
              "Expected more than 1 value per channel when training, got input size ",
              in.y.sizes());
  const auto unit_shape =
      L.groups ? std::vector<int64_t>{L.N, L.groups} : std::vector<int64_t>{L.C};
  const auto acc_options = in.y.options().dtype(at::toOpMathType(in.y.scalar_type()));
  at::Tensor mean = at::zeros(unit_shape, acc_options);
  at::Tensor invstd = at::zeros_like(mean), unbiased_var = at::zeros_like(mean);
  if (in.y.numel() == 0) return {mean, invstd, unbiased_var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.y.scalar_type(), "norm_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor totals =
        plane_sums<kStats, scalar_t, acc_t>(L, in.y, nullptr, in.params<acc_t>({}, {}));
    finish_stats_kernel<scalar_t, acc_t>
        <<<ceil_div(L.units(), kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            totals.const_data_ptr<double>(), in.y.const_data_ptr<scalar_t>(), L, eps,
            mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), unbiased_var.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    map<kApply, scalar_t, acc_t>(L, out, in.y, nullptr, in.params<acc_t>(mean, invstd));
  });
  return {mean, invstd, unbiased_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_act_cuda(
    const at::Tensor& y_in, int64_t groups, const Optional& weight, const Optional& bias,
    double eps, c10::string_view act_name, double slope, const Optional& act_weight) {
  check_dtype("norm_act", y_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const Inputs in("norm_act", y_in, groups, weight, bias, act_name, slope, act_weight);
  at::Tensor out = at::empty_like(in.y);
  auto [mean, invstd, unbiased_var] = norm_act_into(in, out, eps);
  return {out, mean, invstd, unbiased_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_inplace_cuda(
    at::Tensor& y, int64_t groups, const Optional& weight, const Optional& bias, double eps,
    c10::string_view act_name, double slope, const Optional& act_weight) {
  check_dtype("norm_act_", y);
  TORCH_CHECK(y.is_contiguous(y.suggest_memory_format()),
              "norm_act_: y must be dense in its memory format");
  const c10::cuda::CUDAGuard guard(y.device());
  const Inputs in("norm_act_", y, groups, weight, bias, act_name, slope, act_weight);
  return norm_act_into(in, y, eps);  // in.y is y: dense, so not copied
}

at::Tensor norm_act_apply_cuda(const at::Tensor& y_in, int64_t groups, const Optional& weight,
                               const Optional& bias, const at::Tensor& mean_in,
                               const at::Tensor& invstd_in, c10::string_view act_name, double slope,
                               const Optional& act_weight) {
  check_dtype("norm_act_apply", y_in);
  const c10::cuda::CUDAGuard guard(y_in.device());
  const Inputs in("norm_act_apply", y_in, groups, weight, bias, act_name, slope, act_weight);
  const at::Tensor mean = unit_stats("norm_act_apply", mean_in, in),
                   invstd = unit_stats("norm_act_apply", invstd_in, in);
  at::Tensor out = at::empty_like(in.y);
  if (in.y.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.y.scalar_type(), "norm_act_apply", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        map<kApply, scalar_t, acc_t>(in.L, out, in.y, nullptr, in.params<acc_t>(mean, invstd));
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& y_in, int64_t groups, const Optional& weight,
    const Optional& bias, const at::Tensor& mean_in, const at::Tensor& invstd_in,
    c10::string_view act_name, double slope, const Optional& act_weight) {
  check_dtype("norm_act_backward", y_in);
  TORCH_CHECK(grad_out.sizes() == y_in.sizes(), "norm_act_backward: grad_out of shape ",
              grad_out.sizes(), " does not match y of shape ", y_in.sizes());
  const c10::cuda::CUDAGuard guard(y_in.device());
  const Inputs in("norm_act_backward", y_in, groups, weight, bias, act_name, slope, act_weight);
  const Layout& L = in.L;
  const at::Tensor dy =
      grad_out.to(in.y.device(), in.y.scalar_type()).contiguous(in.y.suggest_memory_format());
  const at::Tensor mean = unit_stats("norm_act_backward", mean_in, in),
                   invstd = unit_stats("norm_act_backward", invstd_in, in);
  at::Tensor grad_y = at::empty_like(in.y);
  const auto double_options = in.y.options().dtype(at::kDouble);
  at::Tensor grad_weight = at::zeros({L.C}, double_options);
  at::Tensor grad_bias = at::zeros_like(grad_weight), grad_slope = at::zeros_like(grad_weight);
  if (in.y.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, in.y.scalar_type(), "norm_act_backward", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const auto stream = at::cuda::getCurrentCUDAStream();
          const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
          Params<acc_t> p = in.params<acc_t>(mean, invstd);
          const at::Tensor totals = plane_sums<kGradSums, scalar_t, acc_t>(L, in.y, dyp, p);
          finish_grad_channels_kernel<acc_t><<<ceil_div(L.C, kThreads), kThreads, 0, stream>>>(
              totals.const_data_ptr<double>(), p, L, grad_weight.data_ptr<double>(),
              grad_bias.data_ptr<double>(), grad_slope.data_ptr<double>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          at::Tensor coef_a = at::empty({L.units()}, mean.options()),
                     coef_b = at::empty_like(coef_a);
          finish_grad_units_kernel<acc_t><<<ceil_div(L.units(), kThreads), kThreads, 0, stream>>>(
              totals.const_data_ptr<double>(), p, L, coef_a.data_ptr<acc_t>(),
              coef_b.data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          p.coef_a = coef_a.const_data_ptr<acc_t>();
          p.coef_b = coef_b.const_data_ptr<acc_t>();
          map<kGrad, scalar_t, acc_t>(L, grad_y, in.y, dyp, p);
        });
  }
  const auto param_type = defined(weight) ? weight->scalar_type() : mean.scalar_type();
  // PReLU's weight gradient in its own shape (one slope shared: the channels' sum); else empty
  at::Tensor grad_act_weight = defined(act_weight)
                                   ? (act_weight->numel() == 1 ? grad_slope.sum() : grad_slope)
                                         .reshape(act_weight->sizes())
                                         .to(act_weight->scalar_type())
                                   : at::zeros({0}, double_options.dtype(param_type));
  return {grad_y, grad_weight.to(param_type), grad_bias.to(param_type), grad_act_weight};
}

}  // namespace
}  // namespace unet_fast

TORCH_LIBRARY_IMPL(unet_fast, CUDA, m) {
  m.impl("norm_act", &unet_fast::norm_act_cuda);
  m.impl("norm_act_", &unet_fast::norm_act_inplace_cuda);
  m.impl("norm_act_backward", &unet_fast::norm_act_backward_cuda);
  m.impl("norm_act_apply", &unet_fast::norm_act_apply_cuda);
}
