// Eval mode on CUDA: relu(conv2d(x, w, b)) with BatchNorm already folded into w and b: cuDNN's
// convolution, then ATen's relu_ in place (NaN kept, as F.relu keeps it).
#include <ATen/ops/convolution.h>
#include <ATen/ops/relu.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace unet_fast {
namespace {

using Optional = std::optional<at::Tensor>;

at::Tensor conv_bias_relu_cuda(const at::Tensor& x, const at::Tensor& weight, const Optional& bias,
                               int64_t padding) {
  const c10::cuda::CUDAGuard guard(x.device());
  return at::convolution(x, weight, bias, {1, 1}, {padding, padding}, {1, 1}, false, {0, 0}, 1)
      .relu_()
      .contiguous(x.suggest_memory_format());
}

}  // namespace
}  // namespace unet_fast

TORCH_LIBRARY_IMPL(unet_fast, CUDA, m) {
  m.impl("conv_bias_relu", &unet_fast::conv_bias_relu_cuda);
}
