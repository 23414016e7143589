// conv_bn_relu and double_conv in training mode, and their backward passes: convolutions through
// ATen (oneDNN on CPU, cuDNN on CUDA), BatchNorm + ReLU through the unet_fast::batch_norm_relu*
// kernels of the tensor's device. Device-generic code, registered for each device key.
#include "cpu/conv_bn_relu.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace unet_fast {
namespace {

using Optional = std::optional<at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Tensor4 batch_norm_relu(const at::Tensor& y, const Optional& weight, const Optional& bias,
                        double eps) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("unet_fast::batch_norm_relu", "")
          .typed<Tensor4(const at::Tensor&, const Optional&, const Optional&, double)>();
  return op.call(y, weight, bias, eps);
}

Tensor3 batch_norm_relu_backward(const at::Tensor& grad, const at::Tensor& y,
                                 const Optional& weight, const Optional& bias,
                                 const at::Tensor& mean, const at::Tensor& invstd) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("unet_fast::batch_norm_relu_backward", "")
                       .typed<Tensor3(const at::Tensor&, const at::Tensor&, const Optional&,
                                      const Optional&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad, y, weight, bias, mean, invstd);
}

at::Tensor batch_norm_relu_apply(const at::Tensor& y, const Optional& weight, const Optional& bias,
                                 const at::Tensor& mean, const at::Tensor& invstd) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("unet_fast::batch_norm_relu_apply", "")
                       .typed<at::Tensor(const at::Tensor&, const Optional&, const Optional&,
                                         const at::Tensor&, const at::Tensor&)>();
  return op.call(y, weight, bias, mean, invstd);
}

// Every output follows its input's memory format (x's for activations, the weight's for its
// gradient), whatever layout the convolution backend picks: the fake kernels then agree with the
// real ones on every device, and a no-op copy costs nothing when they match already.
at::Tensor conv(const at::Tensor& x, const at::Tensor& weight, const Optional& bias,
                int64_t padding) {
  return at::convolution(x, weight, bias, {1, 1}, {padding, padding}, {1, 1}, false, {0, 0}, 1)
      .contiguous(x.suggest_memory_format());
}

// Gradients of a 3x3 conv: (grad_x, grad_weight, grad_bias); an empty tensor stands for a
// gradient that is not needed (grad_x when input_grad is false, grad_bias without a bias).
Tensor3 conv_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                      bool has_bias, int64_t padding, bool input_grad) {
  const std::vector<int64_t> bias_size{weight.size(0)};
  auto [gx, gw, gb] = at::convolution_backward(
      grad_y, x, weight, has_bias ? at::OptionalIntArrayRef(bias_size) : std::nullopt, {1, 1},
      {padding, padding}, {1, 1}, false, {0, 0}, 1, {input_grad, true, has_bias});
  auto or_empty = [&](const at::Tensor& t) {
    return t.defined() ? t : at::empty({0}, x.options());
  };
  return {gx.defined() ? gx.contiguous(x.suggest_memory_format()) : or_empty(gx),
          gw.contiguous(weight.suggest_memory_format()), or_empty(gb)};
}

Tensor5 conv_bn_relu(const at::Tensor& x, const at::Tensor& weight, const Optional& bias,
                     const Optional& bn_weight, const Optional& bn_bias, double eps,
                     int64_t padding) {
  at::Tensor y = conv(x, weight, bias, padding);
  auto [out, mean, invstd, var] = batch_norm_relu(y, bn_weight, bn_bias, eps);
  return {out, y, mean, invstd, var};
}

Tensor5 conv_bn_relu_backward(const at::Tensor& grad_out, const at::Tensor& x,
                              const at::Tensor& weight, bool has_bias, const at::Tensor& y,
                              const Optional& bn_weight, const Optional& bn_bias,
                              const at::Tensor& mean, const at::Tensor& invstd, int64_t padding,
                              bool input_grad) {
  auto [grad_y, grad_bn_weight, grad_bn_bias] =
      batch_norm_relu_backward(grad_out, y, bn_weight, bn_bias, mean, invstd);
  auto [grad_x, grad_weight, grad_bias] =
      conv_backward(grad_y, x, weight, has_bias, padding, input_grad);
  return {grad_x, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias};
}

// Saves only x, y1, y2 and the statistics: the middle activation relu(bn(y1)) is recomputed in
// backward instead of being stored.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
double_conv(const at::Tensor& x, const at::Tensor& weight1, const Optional& bias1,
            const Optional& bn_weight1, const Optional& bn_bias1, const at::Tensor& weight2,
            const Optional& bias2, const Optional& bn_weight2, const Optional& bn_bias2,
            double eps1, double eps2, int64_t padding) {
  auto [a1, y1, mean1, invstd1, var1] =
      conv_bn_relu(x, weight1, bias1, bn_weight1, bn_bias1, eps1, padding);
  at::Tensor y2 = conv(a1, weight2, bias2, padding);
  // a1 is dead once y2 exists: on the CPU the second BN+ReLU writes over it
  // (csrc/cpu/conv_bn_relu.h)
  auto [out, mean2, invstd2, var2] =
      y2.is_cpu() ? cpu::batch_norm_relu_into(y2, bn_weight2, bn_bias2, eps2, a1)
                  : batch_norm_relu(y2, bn_weight2, bn_bias2, eps2);
  return {out, y1, y2, mean1, invstd1, var1, mean2, invstd2, var2};
}

std::vector<at::Tensor> double_conv_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight1, bool has_bias1,
    const at::Tensor& y1, const Optional& bn_weight1, const Optional& bn_bias1,
    const at::Tensor& mean1, const at::Tensor& invstd1, const at::Tensor& weight2, bool has_bias2,
    const at::Tensor& y2, const Optional& bn_weight2, const Optional& bn_bias2,
    const at::Tensor& mean2, const at::Tensor& invstd2, int64_t padding, bool input_grad) {
  const at::Tensor a1 = batch_norm_relu_apply(y1, bn_weight1, bn_bias1, mean1, invstd1);
  auto [grad_a1, grad_w2, grad_b2, grad_g2, grad_be2] = conv_bn_relu_backward(
      grad_out, a1, weight2, has_bias2, y2, bn_weight2, bn_bias2, mean2, invstd2, padding, true);
  // grad_a1 is ours: on the CPU layer 1's BN+ReLU gradient is written over it
  auto [grad_y1, grad_g1, grad_be1] =
      y1.is_cpu() ? cpu::batch_norm_relu_backward(grad_a1, y1, bn_weight1, bn_bias1, mean1, invstd1,
                                                  /*over_grad_out=*/true)
                  : batch_norm_relu_backward(grad_a1, y1, bn_weight1, bn_bias1, mean1, invstd1);
  auto [grad_x, grad_w1, grad_b1] =
      conv_backward(grad_y1, x, weight1, has_bias1, padding, input_grad);
  return {grad_x, grad_w1, grad_b1, grad_g1, grad_be1, grad_w2, grad_b2, grad_g2, grad_be2};
}

}  // namespace
}  // namespace unet_fast

// Registered per device (not as a composite) so that compilers see one op with its own fake
// kernel (unet_fast/ops/conv_bn_relu.py) instead of tracing through the decomposition.
#define UNET_FAST_REGISTER_CONV_BN_RELU(KEY)                            \
  TORCH_LIBRARY_IMPL(unet_fast, KEY, m) {                               \
    m.impl("conv_bn_relu", &unet_fast::conv_bn_relu);                   \
    m.impl("conv_bn_relu_backward", &unet_fast::conv_bn_relu_backward); \
    m.impl("double_conv", &unet_fast::double_conv);                     \
    m.impl("double_conv_backward", &unet_fast::double_conv_backward);   \
  }

UNET_FAST_REGISTER_CONV_BN_RELU(CPU)
UNET_FAST_REGISTER_CONV_BN_RELU(CUDA)
