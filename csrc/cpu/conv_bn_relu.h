// The CPU BatchNorm + ReLU kernels, callable by the device-generic training composition
// (csrc/conv_bn_relu.cpp) with buffers it owns: a temporary overwritten costs no new tensor, and
// a new large one costs page faults on the CPU (cpu/buffer_cache.h).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace unet_fast::cpu {

// unet_fast::batch_norm_relu, writing the output into `into` when it is defined and dense in y's
// memory format with y's shape and dtype (a temporary of the caller's, overwritten).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_into(
    const at::Tensor& y, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const at::Tensor& into);

// unet_fast::batch_norm_relu_backward; with over_grad_out, grad_y is written over grad_out when
// grad_out is dense in y's memory format and of y's dtype (the caller's temporary).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& y, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
    bool over_grad_out);

}  // namespace unet_fast::cpu
