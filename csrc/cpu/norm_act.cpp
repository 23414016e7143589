// Norm + activation on the CPU, fused, for 2-D and 3-D activations in channels-first or
// channels-last layout: BatchNorm (statistics per channel over the batch) or GroupNorm
// (statistics per sample and group of channels; InstanceNorm is one channel per group), then
// ReLU, LeakyReLU, PReLU or nothing. Forward = one statistics pass and one normalise+activate pass;
// backward = one reduction pass and one gradient pass, the activation's mask recomputed from y
// (PReLU's weight gradient: one more reduction pass).
//
// Every pass works on (sample, channel) planes: per-plane sums are reduced to the statistics'
// units (a channel for BatchNorm, a (sample, group) for GroupNorm), and per-plane coefficients
// are spread back from them, so one code path serves every norm.
#include "norm_act.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cmath>
#include <functional>
#include <string>

#include "cpu/buffer_cache.h"
#include "cpu/channelwise.h"

namespace unet_fast {
namespace {

using cpu::Io;
using cpu::Shape;
using Optional = std::optional<at::Tensor>;

template <typename scalar_t>
using Vec = typename Io<scalar_t>::Vec;
template <typename scalar_t>
using acc = at::opmath_type<scalar_t>;

// The layout of an (N, C, *spatial) activation and its statistics' units.
struct Layout {
  int64_t N, C, S;  // S: the spatial size (H*W or D*H*W)
  bool channels_last;
  int64_t groups;  // 0: BatchNorm; otherwise GroupNorm groups per sample
  int64_t units() const { return groups ? N * groups : C; }
  int64_t unit_of(int64_t n, int64_t c) const { return groups ? n * groups + c / (C / groups) : c; }
  int64_t count() const { return groups ? (C / groups) * S : N * S; }  // values per unit
};

Layout layout_of(const char* op, const at::Tensor& y, int64_t groups) {
  TORCH_CHECK(y.dim() == 4 || y.dim() == 5, op,
              ": expected a 4-D (N, C, H, W) or 5-D (N, C, D, H, W) tensor, got shape ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble ||
                  y.scalar_type() == at::kBFloat16,
              op, ": expected float32, float64 or bfloat16 on the CPU, got ", y.scalar_type());
  const int64_t C = y.size(1);
  TORCH_CHECK(groups >= 0 && (groups == 0 || (C > 0 && C % groups == 0)), op, ": ", C,
              " channels cannot be split into ", groups, " groups");
  const auto format = y.suggest_memory_format();
  return {y.size(0), C, y.numel() / std::max<int64_t>(y.size(0) * C, 1),
          format == at::MemoryFormat::ChannelsLast || format == at::MemoryFormat::ChannelsLast3d,
          groups};
}

at::MemoryFormat format_of(const at::Tensor& y) { return y.suggest_memory_format(); }

// Runs fn(shape, offset into the data, offset into per-plane arrays) over the planes: one call
// for channels-first data (every plane a channel of a 1-sample tensor), one per sample for
// channels-last data (rows of C channels).
template <typename Fn>
void for_planes(const Layout& l, Fn fn) {
  if (!l.channels_last) return fn(Shape{1, l.N * l.C, l.S, false}, 0, 0);
  for (int64_t n = 0; n < l.N; ++n) fn(Shape{1, l.C, l.S, true}, n * l.S * l.C, n * l.C);
}

// Per-plane coefficient arrays from per-channel and per-unit values.
template <typename A>
std::vector<A> per_plane(const Layout& l, const std::function<A(int64_t n, int64_t c)>& value) {
  std::vector<A> out(l.N * l.C);
  for (int64_t n = 0; n < l.N; ++n)
    for (int64_t c = 0; c < l.C; ++c) out[n * l.C + c] = value(n, c);
  return out;
}

// Per-channel gamma, beta and negative slope in double, viewed from a first channel.
struct Channels {
  const double *gamma, *beta, *slopes;
  Channels from(int64_t c) const { return {gamma + c, beta + c, slopes + c}; }
};

// Per-plane mean, scale = gamma * invstd, beta and the activation's negative slope: the
// pre-activation is (y - mean) * scale + beta, centred so that a tiny variance (a huge scale)
// cancels nothing.
template <typename A>
struct Coefficients {
  std::vector<A> mean, scale, beta, slope;
  Coefficients(const Layout& l, const A* m, const A* is, const Channels& ch)
      : mean(per_plane<A>(l, [&](int64_t n, int64_t c) { return m[l.unit_of(n, c)]; })),
        scale(per_plane<A>(l,
                           [&](int64_t n, int64_t c) {
                             return static_cast<A>(ch.gamma[c] * is[l.unit_of(n, c)]);
                           })),
        beta(per_plane<A>(l, [&](int64_t, int64_t c) { return static_cast<A>(ch.beta[c]); })),
        slope(per_plane<A>(l, [&](int64_t, int64_t c) { return static_cast<A>(ch.slopes[c]); })) {}
};

// A unit's block of a channels-first GroupNorm / InstanceNorm activation: its (C / groups)
// planes are contiguous, so a unit can be normalised on its own while its values stay in cache
// (statistics, then the map: one read from memory instead of two).
struct UnitBlock {
  Layout layout;          // one sample, the unit's channels, one group
  int64_t offset, plane;  // into the data and the per-plane arrays
  int64_t channel;        // the unit's first channel
};

UnitBlock unit_block(const Layout& l, int64_t u) {
  const int64_t size = l.C / l.groups, n = u / l.groups, c = (u % l.groups) * size;
  return {{1, size, l.S, false, 1}, (n * l.C + c) * l.S, n * l.C + c, c};
}

// Whether to work unit by unit: channels-first GroupNorm / InstanceNorm with units large
// enough that a call per unit costs nothing and enough of them to keep every thread busy.
bool by_units(const Layout& l) {
  return !l.channels_last && l.groups > 0 && l.count() >= 16384 &&
         l.units() >= 2 * at::get_num_threads();
}

// Runs block(layout, data offset, plane offset, channel offset, unit offset) once over the whole
// activation, or per unit in parallel (nested parallel loops then run inline).
template <typename Fn>
void for_blocks(const Layout& l, Fn block) {
  if (!by_units(l)) return block(l, 0, 0, 0, 0);
  at::parallel_for(0, l.units(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const UnitBlock b = unit_block(l, u);
      block(b.layout, b.offset, b.plane, b.channel, u);
    }
  });
}

// Per-plane sums of op(y, dy, coefficients), reduced to units.
template <typename scalar_t, size_t K, typename VecOp, typename ScalarOp>
std::pair<std::vector<double>, std::vector<double>> unit_sums(
    const Layout& l, const scalar_t* y, const scalar_t* dy,
    const std::array<const acc<scalar_t>*, K>& coef, VecOp vop, ScalarOp sop) {
  std::vector<double> a(l.units(), 0.0), b(l.units(), 0.0);
  for_planes(l, [&](Shape s, int64_t offset, int64_t plane) {
    std::array<const acc<scalar_t>*, K> shifted;
    for (size_t k = 0; k < K; ++k) shifted[k] = coef[k] + plane;
    auto [sum_a, sum_b] = cpu::channelwise_sums<scalar_t, K>(y + offset, dy ? dy + offset : nullptr,
                                                             s, shifted, vop, sop);
    for (int64_t i = 0; i < s.C; ++i) {
      const int64_t n = (plane + i) / l.C, c = (plane + i) % l.C;
      a[l.unit_of(n, c)] += sum_a[i];
      b[l.unit_of(n, c)] += sum_b[i];
    }
  });
  return {a, b};
}

template <typename scalar_t, size_t K, typename VecOp, typename ScalarOp>
void plane_map(const Layout& l, scalar_t* out, const scalar_t* y, const scalar_t* dy,
               const std::array<const acc<scalar_t>*, K>& coef, VecOp vop, ScalarOp sop) {
  for_planes(l, [&](Shape s, int64_t offset, int64_t plane) {
    std::array<const acc<scalar_t>*, K> shifted;
    for (size_t k = 0; k < K; ++k) shifted[k] = coef[k] + plane;
    cpu::channelwise_map<scalar_t, K>(out + offset, y + offset, dy ? dy + offset : nullptr, s,
                                      shifted, vop, sop);
  });
}

// The activation of the pre-activation a, and its mask applied to d: F.relu's (the gradient
// passes unless a <= 0, so NaN passes it) and F.leaky_relu's and F.prelu's (a > 0 ? d : d *
// slope).
template <typename T>
T activate(Act act, T a, T slope) {
  if (act == Act::kIdentity) return a;
  if (act == Act::kRelu) return (a > 0 || std::isnan(a)) ? a : T(0);
  return a > 0 ? a : a * slope;
}
template <typename V>
V activate_vec(Act act, V a, V slope) {
  if (act == Act::kIdentity) return a;
  if (act == Act::kRelu) return at::vec::maximum(a, V(0));  // maximum propagates NaN
  return V::blendv(a * slope, a, a > V(0));
}
template <typename T>
T mask(Act act, T a, T d, T slope) {
  if (act == Act::kIdentity) return d;
  if (act == Act::kRelu) return a <= 0 ? T(0) : d;
  return a > 0 ? d : d * slope;
}
template <typename V>
V mask_vec(Act act, V a, V d, V slope) {
  if (act == Act::kIdentity) return d;
  if (act == Act::kRelu) return V::blendv(d, V(0), a <= V(0));
  return V::blendv(d * slope, d, a > V(0));
}

// A per-channel affine parameter in double (fill when absent).
std::vector<double> per_channel(const Optional& t, int64_t C, double fill) {
  std::vector<double> out(C, fill);
  if (t.has_value() && t->defined()) {
    const at::Tensor d = t->to(at::kDouble).contiguous();
    std::copy(d.const_data_ptr<double>(), d.const_data_ptr<double>() + C, out.begin());
  }
  return out;
}

void check_param(const char* op, const char* name, const Optional& t, int64_t C) {
  if (t.has_value() && t->defined())
    TORCH_CHECK(t->numel() == C, op, ": ", name, " must have ", C, " elements, got ", t->numel());
}

// out = act((y - mean) * gamma * invstd + beta) per plane, with per-unit statistics.
template <typename scalar_t>
void apply(const Layout& l, scalar_t* out, const scalar_t* y, const acc<scalar_t>* mean,
           const acc<scalar_t>* invstd, const Channels& ch, Act act) {
  using V = Vec<scalar_t>;
  using A = acc<scalar_t>;
  const Coefficients<A> k(l, mean, invstd, ch);
  plane_map<scalar_t, 4>(
      l, out, y, nullptr, {k.mean.data(), k.scale.data(), k.beta.data(), k.slope.data()},
      [act](V v, V, const std::array<V, 4>& k) {
        return activate_vec(act, (v - k[0]) * k[1] + k[2], k[3]);
      },
      [act](A v, A, const std::array<A, 4>& k) {
        return activate(act, (v - k[0]) * k[1] + k[2], k[3]);
      });
}

// Statistics (into the layout's units of mean, invstd, unbiased_var), then the output.
template <typename scalar_t>
void forward(const Layout& l, scalar_t* out, const scalar_t* y, double eps, const Channels& ch,
             Act act, acc<scalar_t>* mean, acc<scalar_t>* invstd, acc<scalar_t>* unbiased_var) {
  using A = acc<scalar_t>;
  // each unit's first value shifts its sums (cpu::ShiftedMoments)
  std::vector<A> unit_first(l.units());
  for (int64_t n = l.N - 1; n >= 0; --n)
    for (int64_t c = l.C - 1; c >= 0; --c)
      unit_first[l.unit_of(n, c)] = y[l.channels_last ? n * l.S * l.C + c : (n * l.C + c) * l.S];
  const auto first =
      per_plane<A>(l, [&](int64_t n, int64_t c) { return unit_first[l.unit_of(n, c)]; });
  const cpu::ShiftedMoments<scalar_t> moments;
  auto [sum, sum_sq] = unit_sums<scalar_t, 1>(l, y, nullptr, {first.data()}, moments, moments);
  cpu::finish_moments<A>(sum, sum_sq, unit_first.data(), l.units(), l.count(), eps, mean, invstd,
                         unbiased_var);
  apply(l, out, y, mean, invstd, ch, act);
}

// The per-plane sums of the backward (masked grad, masked grad * (y - mean), and PReLU's
// pre-activation * grad where it is not > 0) into plane_sums[0..2] + the layout's planes, then
// grad_y = k*gz + a*(y - mean) + b per plane (see norm_act_backward_cpu).
template <typename scalar_t>
void backward(const Layout& l, scalar_t* grad_y, const scalar_t* y, const scalar_t* dy,
              const acc<scalar_t>* m, const acc<scalar_t>* is, const Channels& ch, Act act,
              const std::array<double*, 3>& plane_sums) {
  using V = Vec<scalar_t>;
  using A = acc<scalar_t>;
  const Coefficients<A> k(l, m, is, ch);
  const std::array<const A*, 4> coefficients{k.mean.data(), k.scale.data(), k.beta.data(),
                                             k.slope.data()};
  Layout planes = l;
  planes.groups = l.C;  // one unit per (sample, channel)
  auto [sum_dy, sum_dy_xmu] = unit_sums<scalar_t, 4>(
      planes, y, dy, coefficients,
      [act](V v, V d, const std::array<V, 4>& k) {
        const V masked = mask_vec(act, (v - k[0]) * k[1] + k[2], d, k[3]);
        return std::pair{masked, masked * (v - k[0])};
      },
      [act](A v, A d, const std::array<A, 4>& k) {
        const A masked = mask(act, (v - k[0]) * k[1] + k[2], d, k[3]);
        return std::pair{masked, masked * (v - k[0])};
      });
  if (act == Act::kPrelu) {  // d(out)/d(slope) = the pre-activation where it is not > 0
    auto [sum_negative, unused] = unit_sums<scalar_t, 4>(
        planes, y, dy, coefficients,
        [](V v, V d, const std::array<V, 4>& k) {
          const V pre = (v - k[0]) * k[1] + k[2];
          return std::pair{V::blendv(pre * d, V(0), pre > V(0)), V(0)};
        },
        [](A v, A d, const std::array<A, 4>& k) {
          const A pre = (v - k[0]) * k[1] + k[2];
          return std::pair{pre > 0 ? A(0) : pre * d, A(0)};
        });
    std::copy(sum_negative.begin(), sum_negative.end(), plane_sums[2]);
  }
  std::copy(sum_dy.begin(), sum_dy.end(), plane_sums[0]);
  std::copy(sum_dy_xmu.begin(), sum_dy_xmu.end(), plane_sums[1]);
  std::vector<double> unit_dy(l.units(), 0.0), unit_dy_xmu(l.units(), 0.0);
  for (int64_t n = 0; n < l.N; ++n) {
    for (int64_t c = 0; c < l.C; ++c) {
      const int64_t p = n * l.C + c, u = l.unit_of(n, c);
      unit_dy[u] += ch.gamma[c] * sum_dy[p];
      unit_dy_xmu[u] += ch.gamma[c] * sum_dy_xmu[p];
    }
  }
  const double count = static_cast<double>(l.count());
  std::vector<A> gain(l.N * l.C), slope_y(l.N * l.C), offset(l.N * l.C);
  for (int64_t n = 0; n < l.N; ++n) {
    for (int64_t c = 0; c < l.C; ++c) {
      const int64_t p = n * l.C + c, u = l.unit_of(n, c);
      const double inv = is[u];
      gain[p] = static_cast<A>(ch.gamma[c] * inv);
      slope_y[p] = static_cast<A>(-inv * inv * inv * unit_dy_xmu[u] / count);
      offset[p] = static_cast<A>(-inv * unit_dy[u] / count);
    }
  }
  plane_map<scalar_t, 7>(
      l, grad_y, y, dy,
      {k.mean.data(), k.scale.data(), k.beta.data(), gain.data(), slope_y.data(), offset.data(),
       k.slope.data()},
      [act](V v, V d, const std::array<V, 7>& k) {
        const V centred = v - k[0];
        return mask_vec(act, centred * k[1] + k[2], d, k[6]) * k[3] + centred * k[4] + k[5];
      },
      [act](A v, A d, const std::array<A, 7>& k) {
        const A centred = v - k[0];
        return mask(act, centred * k[1] + k[2], d, k[6]) * k[3] + centred * k[4] + k[5];
      });
}

// gamma, beta and slopes in double, and their view.
struct ChannelParams {
  std::vector<double> gamma, beta, slopes;
  ChannelParams(const char* op, int64_t C, const Optional& weight, const Optional& bias, Act act,
                double slope, const Optional& act_weight)
      : gamma(per_channel(weight, C, 1.0)),
        beta(per_channel(bias, C, 0.0)),
        slopes(per_channel(channel_slopes(op, act, slope, act_weight, C, at::kDouble), C, 0.0)) {}
  Channels view() const { return {gamma.data(), beta.data(), slopes.data()}; }
};

at::Tensor norm_act_apply_cpu(const at::Tensor& y_in, int64_t groups, const Optional& weight,
                              const Optional& bias, const at::Tensor& mean_in,
                              const at::Tensor& invstd_in, c10::string_view act_name, double slope,
                              const Optional& act_weight) {
  const Act act = parse_act(std::string(act_name));
  const auto format = format_of(y_in);
  const at::Tensor y = y_in.contiguous(format);
  const Layout l = layout_of("norm_act_apply", y, groups);
  const auto acc_type = at::toOpMathType(y.scalar_type());
  const at::Tensor mean = mean_in.to(acc_type).contiguous(),
                   invstd = invstd_in.to(acc_type).contiguous();
  TORCH_CHECK(mean.numel() == l.units() && invstd.numel() == l.units(), "norm_act_apply: expected ",
              l.units(), " statistics, got ", mean.numel());
  at::Tensor out = cpu::empty_like(y, format);
  if (y.numel() == 0) return out;
  const ChannelParams params("norm_act_apply", l.C, weight, bias, act, slope, act_weight);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "norm_act_apply", [&] {
    apply(l, out.data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
          mean.const_data_ptr<acc<scalar_t>>(), invstd.const_data_ptr<acc<scalar_t>>(),
          params.view(), act);
  });
  return out;
}

// Statistics of y (dense in its memory format) and act(norm(y)) into out (y itself in place):
// (mean, invstd, unbiased_var).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_into(
    const char* op, const at::Tensor& y, at::Tensor& out, int64_t groups, const Optional& weight,
    const Optional& bias, double eps, c10::string_view act_name, double slope,
    const Optional& act_weight) {
  const Act act = parse_act(std::string(act_name));
  const Layout l = layout_of(op, y, groups);
  check_param(op, "weight", weight, l.C);
  check_param(op, "bias", bias, l.C);
  const ChannelParams params(op, l.C, weight, bias, act, slope, act_weight);
  TORCH_CHECK(groups != 0 || l.count() != 1,
              "Expected more than 1 value per channel when training, got input size ", y.sizes());
  const auto acc_type = at::toOpMathType(y.scalar_type());
  const auto unit_shape = groups ? std::vector<int64_t>{l.N, groups} : std::vector<int64_t>{l.C};
  at::Tensor mean = at::zeros(unit_shape, at::TensorOptions().dtype(acc_type));
  at::Tensor invstd = at::zeros_like(mean), unbiased_var = at::zeros_like(mean);
  if (y.numel() == 0) return {mean, invstd, unbiased_var};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "norm_act", [&] {
    using A = acc<scalar_t>;
    for_blocks(l, [&](const Layout& b, int64_t offset, int64_t, int64_t channel, int64_t unit) {
      forward(b, out.data_ptr<scalar_t>() + offset, y.const_data_ptr<scalar_t>() + offset, eps,
              params.view().from(channel), act, mean.data_ptr<A>() + unit,
              invstd.data_ptr<A>() + unit, unbiased_var.data_ptr<A>() + unit);
    });
  });
  return {mean, invstd, unbiased_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_act_cpu(
    const at::Tensor& y_in, int64_t groups, const Optional& weight, const Optional& bias,
    double eps, c10::string_view act, double slope, const Optional& act_weight) {
  const auto format = format_of(y_in);
  const at::Tensor y = y_in.contiguous(format);
  at::Tensor out = cpu::empty_like(y, format);
  auto [mean, invstd, unbiased_var] =
      norm_act_into("norm_act", y, out, groups, weight, bias, eps, act, slope, act_weight);
  return {out, mean, invstd, unbiased_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_inplace_cpu(
    at::Tensor& y, int64_t groups, const Optional& weight, const Optional& bias, double eps,
    c10::string_view act, double slope, const Optional& act_weight) {
  TORCH_CHECK(y.is_contiguous(format_of(y)), "norm_act_: y must be dense in its memory format");
  return norm_act_into("norm_act_", y, y, groups, weight, bias, eps, act, slope, act_weight);
}

// With gz = the activation's mask applied to grad_out, k = gamma * invstd and n values per unit:
// grad_y = k*gz - invstd * (sum over the unit of gamma*gz)/n - invstd * xhat * (sum of
// gamma*gz*xhat)/n, xhat = (y - mean) * invstd; written as k*gz + a*(y - mean) + b per plane
// (centred: a*y + b' would cancel catastrophically where the variance is tiny and a huge).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y_in, int64_t groups, const Optional& weight,
    const Optional& bias, const at::Tensor& mean_in, const at::Tensor& invstd_in,
    c10::string_view act_name, double slope, const Optional& act_weight) {
  const Act act = parse_act(std::string(act_name));
  TORCH_CHECK(grad_out.sizes() == y_in.sizes(), "norm_act_backward: grad_out of shape ",
              grad_out.sizes(), " does not match y of shape ", y_in.sizes());
  const auto format = format_of(y_in);
  const at::Tensor y = y_in.contiguous(format);
  const at::Tensor dy = grad_out.to(y.scalar_type()).contiguous(format);
  const Layout l = layout_of("norm_act_backward", y, groups);
  const auto acc_type = at::toOpMathType(y.scalar_type());
  const at::Tensor mean = mean_in.to(acc_type).contiguous(),
                   invstd = invstd_in.to(acc_type).contiguous();
  TORCH_CHECK(mean.numel() == l.units() && invstd.numel() == l.units(),
              "norm_act_backward: expected ", l.units(), " statistics, got ", mean.numel());
  const ChannelParams params("norm_act_backward", l.C, weight, bias, act, slope, act_weight);
  at::Tensor grad_y = cpu::empty_like(y, format);
  at::Tensor grad_weight = at::zeros({l.C}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor grad_bias = at::zeros_like(grad_weight);
  at::Tensor grad_slope = at::zeros_like(grad_weight);  // PReLU's, per channel
  if (y.numel() > 0) {
    // per-plane sums (the affine gradients are per channel: summed over the samples below)
    std::vector<double> sums(3 * l.N * l.C, 0.0);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "norm_act_backward", [&] {
      using A = acc<scalar_t>;
      for_blocks(
          l, [&](const Layout& b, int64_t offset, int64_t plane, int64_t channel, int64_t unit) {
            double* first = sums.data() + plane;
            backward(b, grad_y.data_ptr<scalar_t>() + offset, y.const_data_ptr<scalar_t>() + offset,
                     dy.const_data_ptr<scalar_t>() + offset, mean.const_data_ptr<A>() + unit,
                     invstd.const_data_ptr<A>() + unit, params.view().from(channel), act,
                     {first, first + l.N * l.C, first + 2 * l.N * l.C});
          });
      const A* is = invstd.const_data_ptr<A>();
      double* gw = grad_weight.data_ptr<double>();
      double* gb = grad_bias.data_ptr<double>();
      double* gs = grad_slope.data_ptr<double>();
      for (int64_t p = 0; p < l.N * l.C; ++p) {
        const int64_t c = p % l.C;
        gb[c] += sums[p];
        gw[c] += sums[l.N * l.C + p] * is[l.unit_of(p / l.C, c)];
        gs[c] += sums[2 * l.N * l.C + p];
      }
    });
  }
  const auto param_type = defined(weight) ? weight->scalar_type() : acc_type;
  // PReLU's weight gradient in its own shape (one slope shared: the channels' sum); else empty
  at::Tensor grad_act_weight = defined(act_weight)
                                   ? (act_weight->numel() == 1 ? grad_slope.sum() : grad_slope)
                                         .reshape(act_weight->sizes())
                                         .to(act_weight->scalar_type())
                                   : at::zeros({0}, at::TensorOptions().dtype(param_type));
  return {grad_y, grad_weight.to(param_type), grad_bias.to(param_type), grad_act_weight};
}

}  // namespace
}  // namespace unet_fast

TORCH_LIBRARY_IMPL(unet_fast, CPU, m) {
  m.impl("norm_act", &unet_fast::norm_act_cpu);
  m.impl("norm_act_", &unet_fast::norm_act_inplace_cpu);
  m.impl("norm_act_backward", &unet_fast::norm_act_backward_cpu);
  m.impl("norm_act_apply", &unet_fast::norm_act_apply_cpu);
}
