// BatchNorm (batch statistics) + ReLU on the CPU, fused: forward = one statistics pass and one
// normalise+ReLU pass over y; backward = one reduction pass and one gradient pass. The ReLU mask
// is recomputed from y, so nothing but y, mean and invstd is kept for backward.
#include "cpu/conv_bn_relu.h"

#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "cpu/buffer_cache.h"
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

// out = relu(y * scale + shift) per channel; NaN propagates like F.relu. out may be the first
// s.C channels of a tensor out_channels wide.
template <typename scalar_t>
void apply_kernel(scalar_t* out, const scalar_t* y, Shape s, const acc<scalar_t>* scale,
                  const acc<scalar_t>* shift, int64_t out_channels = 0) {
  using V = Vec<scalar_t>;
  using A = acc<scalar_t>;
  cpu::channelwise_map<scalar_t, 2>(
      out, y, nullptr, s, {scale, shift},
      [](V v, V, const std::array<V, 2>& k) { return at::vec::maximum(v * k[0] + k[1], V(0)); },
      [](A v, A, const std::array<A, 2>& k) {
        const A a = v * k[0] + k[1];
        return (a > 0 || std::isnan(a)) ? a : A(0);
      },
      out_channels);
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

// Writes into `into` when given (dense in y's format, y's shape and dtype), else a new tensor.
at::Tensor apply(const at::Tensor& y, at::MemoryFormat format, const at::Tensor& scale,
                 const at::Tensor& shift, const at::Tensor& into = {}) {
  at::Tensor out = into.defined() ? into : cpu::empty_like(y, format);
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

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu::batch_norm_relu_into(
    const at::Tensor& y_in, const Optional& weight, const Optional& bias, double eps,
    const at::Tensor& into) {
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
  if (count == 0) return {cpu::empty_like(y, format), mean, invstd, unbiased_var};
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
  const bool reuse = into.defined() && into.sizes() == y.sizes() &&
                     into.scalar_type() == y.scalar_type() && into.is_contiguous(format);
  return {apply(y, format, scale, shift, reuse ? into : at::Tensor()), mean, invstd, unbiased_var};
}

// d/dy of relu(bn(y)): with m = [not y * scale + shift <= 0] (F.relu's: NaN passes), k = gamma *
// invstd and n values per channel, grad_y = k * (m*dy - sum(m*dy)/n - xhat * sum(m*dy*xhat)/n),
// xhat = (y - mean) * invstd. Written as m*dy*k + a*y + b, with a =
// -k*invstd^2*sum(m*dy*(y-mean))/n, b = -k*sum(m*dy)/n - a*mean.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu::batch_norm_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& y_in, const Optional& weight,
    const Optional& bias, const at::Tensor& mean_in, const at::Tensor& invstd_in,
    bool over_grad_out) {
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
  // the gradient pass reads dy[i] and writes grad_y[i] in the same step: it may overwrite dy
  at::Tensor grad_y = over_grad_out && dy.is_same(grad_out) ? dy : cpu::empty_like(y, format);
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

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cpu(
    const at::Tensor& y, const Optional& weight, const Optional& bias, double eps) {
  return cpu::batch_norm_relu_into(y, weight, bias, eps, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const Optional& weight, const Optional& bias,
    const at::Tensor& mean, const at::Tensor& invstd) {
  return cpu::batch_norm_relu_backward(grad_out, y, weight, bias, mean, invstd, false);
}

// [relu(bn(y)), up] on channels (y and up of one batch size and spatial size): the decoder join's
// input rebuilt from the skip's recipe, the skip written straight into its channels.
at::Tensor batch_norm_relu_concat_cpu(const at::Tensor& y_in, const Optional& weight,
                                      const Optional& bias, const at::Tensor& mean,
                                      const at::Tensor& invstd, const at::Tensor& up) {
  check_activation("batch_norm_relu_concat", y_in);
  TORCH_CHECK(
      up.dim() == 4 && up.size(0) == y_in.size(0) && up.sizes().slice(2) == y_in.sizes().slice(2),
      "batch_norm_relu_concat: up of shape ", up.sizes(), " must match y of shape ", y_in.sizes(),
      " but in channels");
  TORCH_CHECK(up.scalar_type() == y_in.scalar_type(), "batch_norm_relu_concat: up is ",
              up.scalar_type(), " but y is ", y_in.scalar_type());
  const auto format = y_in.suggest_memory_format();
  const at::Tensor y = y_in.contiguous(format);
  const int64_t C = y.size(1), channels = C + up.size(1);
  at::Tensor out = cpu::empty({y.size(0), channels, y.size(2), y.size(3)}, y.options(), format);
  out.narrow(1, C, up.size(1)).copy_(up);
  if (y.numel() == 0) return out;
  const auto acc_type = at::toOpMathType(y.scalar_type());
  auto [scale, shift] = affine(mean.to(acc_type), invstd.to(acc_type), weight, bias);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "batch_norm_relu_concat", [&] {
    apply_kernel<scalar_t>(out.data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                           shape_of(y, format), scale.const_data_ptr<acc<scalar_t>>(),
                           shift.const_data_ptr<acc<scalar_t>>(), channels);
  });
  return out;
}

// One 2x2 window of max_pool2d_backward over x = relu(y * scale + shift) (x rebuilt as
// batch_norm_relu_apply computes and stores it), plus x's other gradient gx: out[p] = gx[p] + (p
// is the window's argmax ? g : 0), the argmax as ATen's max pooling finds it (the first maximum
// in row-major order; NaN wins). T is a scalar or a Vectorized lane pack of the accumulation
// type; `round` gives x the precision batch_norm_relu_apply stores it in.
template <typename T, typename Round>
void pool_window(const T (&y)[4], T scale, T shift, T g, const T* gx, T (&out)[4], Round round) {
  auto x = [&](int p) {
    if constexpr (std::is_floating_point_v<T>) {
      const T a = y[p] * scale + shift;
      return round((a > 0 || std::isnan(a)) ? a : T(0));
    } else {
      return at::vec::maximum(y[p] * scale + shift, T(0));
    }
  };
  T max = x(0), best(0);  // x >= 0 or NaN: the first position beats ATen's initial -inf
  for (int p = 1; p < 4; ++p) {
    const T xp = x(p);
    if constexpr (std::is_floating_point_v<T>) {
      if (xp > max || std::isnan(xp)) max = xp, best = T(p);
    } else {
      const T take = (xp > max) | xp.isnan();
      max = T::blendv(max, xp, take), best = T::blendv(best, T(p), take);
    }
  }
  for (int p = 0; p < 4; ++p) {
    T pooled;
    if constexpr (std::is_floating_point_v<T>) {
      pooled = best == T(p) ? g : T(0);
    } else {
      pooled = T::blendv(T(0), g, best == T(p));
    }
    out[p] = gx ? gx[p] + pooled : pooled;
  }
}

// The gradient reaching x = relu(bn(y)) through max_pool2d(x, 2, 2), plus grad_x (x's gradient
// from its other consumer, the decoder's join) when given, in one pass over y. Rows and columns
// outside every window (odd sizes) get grad_x + 0 (as autograd's sum would).
at::Tensor batch_norm_relu_max_pool_backward_cpu(const at::Tensor& grad_pooled_in,
                                                 const Optional& grad_x_in, const at::Tensor& y_in,
                                                 const Optional& weight, const Optional& bias,
                                                 const at::Tensor& mean, const at::Tensor& invstd) {
  check_activation("batch_norm_relu_max_pool_backward", y_in);
  const int64_t N = y_in.size(0), C = y_in.size(1), H = y_in.size(2), W = y_in.size(3);
  const int64_t PH = H / 2, PW = W / 2;
  TORCH_CHECK(grad_pooled_in.sizes() == c10::IntArrayRef({N, C, PH, PW}),
              "batch_norm_relu_max_pool_backward: grad_pooled must have shape ",
              c10::IntArrayRef({N, C, PH, PW}), ", got ", grad_pooled_in.sizes());
  const bool has_grad_x = grad_x_in.has_value() && grad_x_in->defined();
  TORCH_CHECK(!has_grad_x || grad_x_in->sizes() == y_in.sizes(),
              "batch_norm_relu_max_pool_backward: grad_x does not match y of shape ", y_in.sizes());
  const auto format = y_in.suggest_memory_format();
  const at::Tensor y = y_in.contiguous(format);
  const at::Tensor grad_pooled = grad_pooled_in.to(y.scalar_type()).contiguous(format);
  const bool nhwc = format == at::MemoryFormat::ChannelsLast;
  // grad_x is read where it lies (the join's gradient: a channel slice of a wider tensor); the
  // channels-last loop needs its channels adjacent
  at::Tensor grad_x = has_grad_x ? grad_x_in->to(y.scalar_type()) : at::Tensor();
  if (has_grad_x && nhwc && grad_x.stride(1) != 1) grad_x = grad_x.contiguous(format);
  const auto acc_type = at::toOpMathType(y.scalar_type());
  auto [scale, shift] = affine(mean.to(acc_type), invstd.to(acc_type), weight, bias);
  at::Tensor out = cpu::empty_like(y, format);
  if (y.numel() == 0) return out;
  // strides of (c, h, w) in y's layout and in the pooled gradient's
  const int64_t s_c = nhwc ? 1 : H * W, s_h = nhwc ? W * C : W, s_w = nhwc ? C : 1;
  const int64_t p_c = nhwc ? 1 : PH * PW, p_h = nhwc ? PW * C : PW, p_w = nhwc ? C : 1;
  const auto gs = has_grad_x ? grad_x.strides() : y.strides();  // (n, c, h, w)
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "batch_norm_relu_max_pool", [&] {
    using A = acc<scalar_t>;
    using V = cpu::Vectorized<A>;
    constexpr bool vectorised = std::is_same_v<scalar_t, A>;  // float, double: no rounding
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad_pooled.const_data_ptr<scalar_t>();
    const scalar_t* gxp = has_grad_x ? grad_x.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const A* sc = scale.const_data_ptr<A>();
    const A* sh = shift.const_data_ptr<A>();
    auto round = [](A x) { return static_cast<A>(static_cast<scalar_t>(x)); };
    at::parallel_for(0, N * ((H + 1) / 2), 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / ((H + 1) / 2), ph = row % ((H + 1) / 2);
        const int64_t top = n * C * H * W + 2 * ph * s_h, g_top = n * gs[0] + 2 * ph * gs[2];
        for (int64_t w0 = 0; w0 < W; w0 += 2) {
          const int64_t at[4] = {top + w0 * s_w, top + (w0 + 1) * s_w, top + s_h + w0 * s_w,
                                 top + s_h + (w0 + 1) * s_w};
          const int64_t g_at[4] = {g_top + w0 * gs[3], g_top + (w0 + 1) * gs[3],
                                   g_top + gs[2] + w0 * gs[3], g_top + gs[2] + (w0 + 1) * gs[3]};
          if (ph >= PH || w0 / 2 >= PW) {  // outside every window: grad_x + 0, or 0
            for (int p = 0; p < 4; ++p) {
              const int64_t h = 2 * ph + p / 2, w = w0 + p % 2;
              if (h >= H || w >= W) continue;
              for (int64_t c = 0; c < C; ++c) {
                const A other = gxp ? static_cast<A>(gxp[g_at[p] + c * gs[1]]) + A(0) : A(0);
                op[at[p] + c * s_c] = static_cast<scalar_t>(other);
              }
            }
            continue;
          }
          const int64_t pooled = n * C * PH * PW + ph * p_h + (w0 / 2) * p_w;
          int64_t c = 0;
          if constexpr (vectorised) {
            if (nhwc) {
              for (; c + V::size() <= C; c += V::size()) {
                V ys[4], gxs[4], outs[4];
                for (int p = 0; p < 4; ++p) {
                  ys[p] = V::loadu(yp + at[p] + c);
                  if (gxp) gxs[p] = V::loadu(gxp + g_at[p] + c);
                }
                pool_window<V>(ys, V::loadu(sc + c), V::loadu(sh + c), V::loadu(gp + pooled + c),
                               gxp ? gxs : nullptr, outs, [](V x) { return x; });
                for (int p = 0; p < 4; ++p) outs[p].store(op + at[p] + c);
              }
            }
          }
          for (; c < C; ++c) {
            A ys[4], gxs[4], outs[4];
            for (int p = 0; p < 4; ++p) {
              ys[p] = static_cast<A>(yp[at[p] + c * s_c]);
              if (gxp) gxs[p] = static_cast<A>(gxp[g_at[p] + c * gs[1]]);
            }
            pool_window<A>(ys, sc[c], sh[c], static_cast<A>(gp[pooled + c * p_c]),
                           gxp ? gxs : nullptr, outs, round);
            for (int p = 0; p < 4; ++p) op[at[p] + c * s_c] = static_cast<scalar_t>(outs[p]);
          }
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace unet_fast

TORCH_LIBRARY_IMPL(unet_fast, CPU, m) {
  m.impl("batch_norm_relu", &unet_fast::batch_norm_relu_cpu);
  m.impl("batch_norm_relu_backward", &unet_fast::batch_norm_relu_backward_cpu);
  m.impl("batch_norm_relu_apply", &unet_fast::batch_norm_relu_apply_cpu);
  m.impl("batch_norm_relu_max_pool_backward", &unet_fast::batch_norm_relu_max_pool_backward_cpu);
  m.impl("batch_norm_relu_concat", &unet_fast::batch_norm_relu_concat_cpu);
}
