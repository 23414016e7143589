// BatchNorm (batch statistics) + ReLU on the CPU, fused: forward = one statistics pass and one
// normalise+ReLU pass over y; backward = one reduction pass and one gradient pass. The ReLU mask
// is recomputed from y, so nothing but y, mean and invstd is kept for backward.
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/channelwise.h"

namespace unet_fast {
namespace {

using cpu::Io;
using cpu::Shape;
using Optional = std::optional<at::Tensor>;

Shape shape_of(const at::Tensor& y, at::MemoryFormat format) {
  return {y.size(0), y.size(1), y.size(2) * y.size(3), format == at::MemoryFormat::ChannelsLast};
}

// A per-channel parameter as a contiguous tensor of the accumulation type (fill when absent).
at::Tensor per_channel(const Optional& t, int64_t C, double fill, at::ScalarType acc) {
  if (t.has_value() && t->defined()) return t->to(acc).contiguous();
  return at::full({C}, fill, at::TensorOptions().dtype(acc));
}

void check_activation(const char* op, const at::Tensor& y) {
  TORCH_CHECK(y.dim() == 4, op, ": expected a 4-D (N, C, H, W) tensor, got shape ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble ||
                  y.scalar_type() == at::kBFloat16,
              op, ": expected float32, float64 or bfloat16 on the CPU, got ", y.scalar_type());
}

template <typename scalar_t>
using Vec = typename Io<scalar_t>::Vec;
template <typename scalar_t>
using acc = at::opmath_type<scalar_t>;

// out = relu(y * scale + shift) per channel; NaN propagates like F.relu.
template <typename scalar_t>
void apply_kernel(scalar_t* out, const scalar_t* y, Shape s, const acc<scalar_t>* scale,
                  const acc<scalar_t>* shift) {
  using V = Vec<scalar_t>;
  using A = acc<scalar_t>;
  cpu::channelwise_map<scalar_t, 2>(
      out, y, nullptr, s, {scale, shift},
      [](V v, V, const std::array<V, 2>& k) { return at::vec::maximum(v * k[0] + k[1], V(0)); },
      [](A v, A, const std::array<A, 2>& k) {
        const A a = v * k[0] + k[1];
        return (a > 0 || std::isnan(a)) ? a : A(0);
      });
}

// scale = gamma * invstd, shift = beta - mean * scale: relu(bn(y)) = relu(y * scale + shift).
std::pair<at::Tensor, at::Tensor> affine(const at::Tensor& mean, const at::Tensor& invstd,
                                         const Optional& weight, const Optional& bias) {
  const auto acc_type = mean.scalar_type();
  const int64_t C = mean.numel();
  at::Tensor scale = per_channel(weight, C, 1.0, acc_type).mul(invstd);
  at::Tensor shift = per_channel(bias, C, 0.0, acc_type).sub(mean.mul(scale));
  return {scale, shift};
}

at::Tensor apply(const at::Tensor& y, at::MemoryFormat format, const at::Tensor& scale,
                 const at::Tensor& shift) {
  at::Tensor out = at::empty_like(y, format);
  if (y.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "batch_norm_relu_apply", [&] {
    apply_kernel<scalar_t>(out.data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                           shape_of(y, format), scale.const_data_ptr<acc<scalar_t>>(),
                           shift.const_data_ptr<acc<scalar_t>>());
  });
  return out;
}

at::Tensor batch_norm_relu_apply_cpu(const at::Tensor& y_in, const Optional& weight,
                                     const Optional& bias, const at::Tensor& mean,
                                     const at::Tensor& invstd) {
  check_activation("batch_norm_relu_apply", y_in);
  const auto format = y_in.suggest_memory_format();
  const at::Tensor y = y_in.contiguous(format);
  const auto acc_type = at::toOpMathType(y.scalar_type());
  auto [scale, shift] = affine(mean.to(acc_type), invstd.to(acc_type), weight, bias);
  return apply(y, format, scale, shift);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cpu(
    const at::Tensor& y_in, const Optional& weight, const Optional& bias, double eps) {
  check_activation("batch_norm_relu", y_in);
  const auto format = y_in.suggest_memory_format();
  const at::Tensor y = y_in.contiguous(format);
  const Shape s = shape_of(y, format);
  const int64_t count = s.N * s.HW;
  TORCH_CHECK(count != 1, "Expected more than 1 value per channel when training, got input size ",
              y.sizes());
  const auto acc_type = at::toOpMathType(y.scalar_type());
  at::Tensor mean = at::zeros({s.C}, at::TensorOptions().dtype(acc_type));
  at::Tensor invstd = at::zeros_like(mean);
  at::Tensor unbiased_var = at::zeros_like(mean);
  if (count == 0) return {at::empty_like(y, format), mean, invstd, unbiased_var};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "batch_norm_relu", [&] {
    using A = acc<scalar_t>;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    // each channel's first value shifts its sums (cpu::ShiftedMoments)
    std::vector<A> first(s.C);
    for (int64_t c = 0; c < s.C; ++c) first[c] = static_cast<A>(yp[s.nhwc ? c : c * s.HW]);
    const cpu::ShiftedMoments<scalar_t> moments;
    auto [sum, sum_sq] =
        cpu::channelwise_sums<scalar_t, 1>(yp, nullptr, s, {first.data()}, moments, moments);
    cpu::finish_moments<A>(sum, sum_sq, first.data(), s.C, count, eps, mean.data_ptr<A>(),
                           invstd.data_ptr<A>(), unbiased_var.data_ptr<A>());
  });
  auto [scale, shift] = affine(mean, invstd, weight, bias);
  return {apply(y, format, scale, shift), mean, invstd, unbiased_var};
}

// d/dy of relu(bn(y)): with m = [not y * scale + shift <= 0] (F.relu's: NaN passes), k = gamma *
// invstd and n values per channel, grad_y = k * (m*dy - sum(m*dy)/n - xhat * sum(m*dy*xhat)/n),
// xhat = (y - mean) * invstd. Written as m*dy*k + a*y + b, with a =
// -k*invstd^2*sum(m*dy*(y-mean))/n, b = -k*sum(m*dy)/n - a*mean.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y_in, const Optional& weight,
    const Optional& bias, const at::Tensor& mean_in, const at::Tensor& invstd_in) {
  check_activation("batch_norm_relu_backward", y_in);
  TORCH_CHECK(grad_out.sizes() == y_in.sizes(), "batch_norm_relu_backward: grad_out of shape ",
              grad_out.sizes(), " does not match y of shape ", y_in.sizes());
  const auto format = y_in.suggest_memory_format();
  const at::Tensor y = y_in.contiguous(format);
  const at::Tensor dy = grad_out.to(y.scalar_type()).contiguous(format);
  const Shape s = shape_of(y, format);
  const int64_t count = s.N * s.HW;
  const auto acc_type = at::toOpMathType(y.scalar_type());
  const at::Tensor mean = mean_in.to(acc_type).contiguous(),
                   invstd = invstd_in.to(acc_type).contiguous();
  auto [scale, shift] = affine(mean, invstd, weight, bias);
  const at::Tensor gamma = per_channel(weight, s.C, 1.0, acc_type);
  at::Tensor grad_y = at::empty_like(y, format);
  at::Tensor grad_weight = at::zeros_like(mean), grad_bias = at::zeros_like(mean);
  if (count > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "batch_norm_relu_backward", [&] {
      using V = Vec<scalar_t>;
      using A = acc<scalar_t>;
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
      const A* sc = scale.const_data_ptr<A>();
      const A* sh = shift.const_data_ptr<A>();
      const A* m = mean.const_data_ptr<A>();
      auto [sum_dy, sum_dy_xmu] = cpu::channelwise_sums<scalar_t, 3>(
          yp, dyp, s, {sc, sh, m},
          [](V v, V d, const std::array<V, 3>& k) {
            const V masked = V::blendv(d, V(0), (v * k[0] + k[1]) <= V(0));
            return std::pair{masked, masked * (v - k[2])};
          },
          [](A v, A d, const std::array<A, 3>& k) {
            const A masked = (v * k[0] + k[1]) <= 0 ? A(0) : d;
            return std::pair{masked, masked * (v - k[2])};
          });
      std::vector<A> gain(s.C), slope(s.C), offset(s.C);
      const A* is = invstd.const_data_ptr<A>();
      const A* g = gamma.const_data_ptr<A>();
      A* gw = grad_weight.data_ptr<A>();
      A* gb = grad_bias.data_ptr<A>();
      for (int64_t c = 0; c < s.C; ++c) {
        const double k = double(g[c]) * is[c];
        const double a = -k * is[c] * is[c] * sum_dy_xmu[c] / count;
        gain[c] = static_cast<A>(k);
        slope[c] = static_cast<A>(a);
        offset[c] = static_cast<A>(-k * sum_dy[c] / count - a * m[c]);
        gw[c] = static_cast<A>(sum_dy_xmu[c] * is[c]);
        gb[c] = static_cast<A>(sum_dy[c]);
      }
      cpu::channelwise_map<scalar_t, 5>(
          grad_y.data_ptr<scalar_t>(), yp, dyp, s,
          {sc, sh, gain.data(), slope.data(), offset.data()},
          [](V v, V d, const std::array<V, 5>& k) {
            return V::blendv(d * k[2], V(0), (v * k[0] + k[1]) <= V(0)) + v * k[3] + k[4];
          },
          [](A v, A d, const std::array<A, 5>& k) {
            return ((v * k[0] + k[1]) <= 0 ? A(0) : d * k[2]) + v * k[3] + k[4];
          });
    });
  }
  const auto param_type =
      weight.has_value() && weight->defined() ? weight->scalar_type() : acc_type;
  return {grad_y, grad_weight.to(param_type), grad_bias.to(param_type)};
}

}  // namespace
}  // namespace unet_fast

TORCH_LIBRARY_IMPL(unet_fast, CPU, m) {
  m.impl("batch_norm_relu", &unet_fast::batch_norm_relu_cpu);
  m.impl("batch_norm_relu_backward", &unet_fast::batch_norm_relu_backward_cpu);
  m.impl("batch_norm_relu_apply", &unet_fast::batch_norm_relu_apply_cpu);
}
