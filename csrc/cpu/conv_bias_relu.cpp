// Eval mode on the CPU: relu(conv2d(x, w, b)) with BatchNorm already folded into w and b. oneDNN
// runs the convolution (prepacked weights dispatch through the MkldnnCPU key); the ReLU follows
// in place with ATen's relu_, which keeps NaN as F.relu does. oneDNN's ReLU post-op would map NaN
// to 0 (its max(x, 0) returns the 0) and turn a corrupted input into plausible output.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/relu.h>
#include <torch/library.h>

namespace unet_fast {
namespace {

using Optional = std::optional<at::Tensor>;

at::Tensor conv_bias_relu_cpu(const at::Tensor& x, const at::Tensor& weight, const Optional& bias,
                              int64_t padding) {
  const bool onednn = at::globalContext().userEnabledMkldnn() &&
                      (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16);
  at::Tensor y;
  if (onednn) {
    static auto pointwise =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("mkldnn::_convolution_pointwise", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const Optional&,
                              at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                              c10::string_view, c10::List<std::optional<at::Scalar>>,
                              std::optional<c10::string_view>)>();
    y = pointwise.call(x, weight, bias, {padding, padding}, {1, 1}, {1, 1}, 1, "none",
                       c10::List<std::optional<at::Scalar>>(), "");
  } else {
    y = at::convolution(x, weight, bias, {1, 1}, {padding, padding}, {1, 1}, false, {0, 0}, 1);
  }
  // in the input's memory format, as the fake kernel says, whatever oneDNN picks
  return y.relu_().contiguous(x.suggest_memory_format());
}

}  // namespace
}  // namespace unet_fast

TORCH_LIBRARY_IMPL(unet_fast, CPU, m) { m.impl("conv_bias_relu", &unet_fast::conv_bias_relu_cpu); }

// Eval-mode weights prepacked in oneDNN's blocked layout (an MkldnnCPU tensor) dispatch here.
TORCH_LIBRARY_IMPL(unet_fast, MkldnnCPU, m) {
  m.impl("conv_bias_relu", &unet_fast::conv_bias_relu_cpu);
}
