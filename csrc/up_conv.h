// up_conv_backward: the gradients of a transposed convolution whose stride equals its kernel, as
// two matrix products. Device-generic ATen code, registered per device by csrc/cpu/up_conv.cpp
// and csrc/cuda/up_conv.cu.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <numeric>
#include <tuple>
#include <vector>

#include "cpu/buffer_cache.h"

namespace unet_fast {

// With the stride equal to the kernel, output pixel s * k + t (per axis) comes from input pixel s
// and kernel tap t alone: the layer is one product per input pixel of [C_in] by [C_in, K * C_out]
// (K taps) and a pixel shuffle. With X = x as [N * S, C_in], W = weight as [C_in, K * C_out] and
// G = grad regrouped as [N * S, K * C_out] (one copy):
//   grad_x = G W^T,  grad_weight = X^T G,  grad_bias = the column sums of G, summed over taps.
// On channels-last data X and W are views of x and weight. Channels-first data would need copies
// of x and grad_x too: ATen's own backward then.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> up_conv_backward(const at::Tensor& grad,
                                                                       const at::Tensor& x,
                                                                       const at::Tensor& weight,
                                                                       std::array<bool, 3> mask) {
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, "up_conv_backward: x must be 4-D or 5-D, got ",
              x.sizes());
  TORCH_CHECK(weight.dim() == x.dim() && weight.size(0) == x.size(1), "up_conv_backward: weight ",
              weight.sizes(), " does not match x ", x.sizes());
  const int64_t dims = x.dim() - 2, n = x.size(0), c_in = x.size(1), c_out = weight.size(1);
  const auto kernel = weight.sizes().slice(2);
  std::vector<int64_t> grad_size{n, c_out};
  for (int64_t i = 0; i < dims; ++i) grad_size.push_back(x.size(2 + i) * kernel[i]);
  TORCH_CHECK(grad.sizes() == c10::IntArrayRef(grad_size),
              "up_conv_backward: grad must have shape ", grad_size, ", got ", grad.sizes());
  const auto format = x.suggest_memory_format();
  const auto weight_format = weight.suggest_memory_format();
  const auto empty = [&] { return x.new_empty({0}); };  // one per output: outputs never alias
  if (format == at::MemoryFormat::Contiguous) {
    const std::vector<int64_t> ones(dims, 1), zeros(dims, 0);
    auto [grad_x, grad_w, grad_b] =
        at::convolution_backward(grad, x, weight, c10::IntArrayRef{c_out}, kernel, zeros, ones,
                                 /*transposed=*/true, zeros, /*groups=*/1, mask);
    return {mask[0] ? grad_x : empty(), mask[1] ? grad_w.contiguous(weight_format) : empty(),
            mask[2] ? grad_b : empty()};
  }
  const int64_t taps =
      std::accumulate(kernel.begin(), kernel.end(), int64_t{1}, std::multiplies<>());
  // grad channels-last is (N, S_1, k_1, S_2, k_2, [S_3, k_3,] C_out) in memory: taps to the back
  std::vector<int64_t> split{n}, order{0};
  for (int64_t i = 0; i < dims; ++i) {
    split.insert(split.end(), {x.size(2 + i), kernel[i]});
    order.push_back(1 + 2 * i);
  }
  for (int64_t i = 0; i < dims; ++i) order.push_back(2 + 2 * i);
  split.push_back(c_out);
  order.push_back(2 * dims + 1);
  const auto by_tap = grad.movedim(1, -1).reshape(split).permute(order);
  at::Tensor g = by_tap;
  if (!by_tap.is_contiguous()) {
    g = cached_empty(by_tap.sizes(), grad.options(), at::MemoryFormat::Contiguous);
    g.copy_(by_tap);
  }
  g = g.view({-1, taps * c_out});
  const auto w = weight.movedim(1, -1).reshape({c_in, taps * c_out});
  at::Tensor grad_x = empty(), grad_w = empty(), grad_b = empty();
  if (mask[0]) {
    std::vector<int64_t> size{n};
    for (int64_t i = 0; i < dims; ++i) size.push_back(x.size(2 + i));
    size.push_back(c_in);
    grad_x = cached_empty({g.size(0), c_in}, grad.options(), at::MemoryFormat::Contiguous);
    at::mm_out(grad_x, g, w.t());
    grad_x = grad_x.view(size).movedim(-1, 1);
  }
  if (mask[1]) {
    std::vector<int64_t> size{c_in};
    size.insert(size.end(), kernel.begin(), kernel.end());
    size.push_back(c_out);
    const auto rows = x.movedim(1, -1).reshape({-1, c_in});
    grad_w = at::mm(rows.t(), g).view(size).movedim(-1, 1).contiguous(weight_format);
  }
  if (mask[2]) grad_b = g.sum(0).view({taps, c_out}).sum(0);
  return {grad_x, grad_w, grad_b};
}

}  // namespace unet_fast
