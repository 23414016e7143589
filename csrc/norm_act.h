// norm_act's activation and PReLU's weight, shared by the CPU and CUDA backends.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

namespace unet_fast {

// PReLU is LeakyReLU with a slope per channel (or one for all) that is a parameter.
enum class Act : int { kRelu, kLeakyRelu, kPrelu, kIdentity };

inline Act parse_act(std::string_view act) {
  if (act == "relu") return Act::kRelu;
  if (act == "leaky_relu") return Act::kLeakyRelu;
  if (act == "prelu") return Act::kPrelu;
  if (act == "identity") return Act::kIdentity;
  TORCH_CHECK(false, "norm_act: act must be relu, leaky_relu, prelu or identity, got ", act);
}

inline bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Each channel's negative slope, C values of `options` (dtype and device): PReLU's weight (one
// per channel, or one for all), LeakyReLU's slope, 0 otherwise (unused).
inline at::Tensor channel_slopes(const char* op, Act act, double slope,
                                 const std::optional<at::Tensor>& prelu, int64_t C,
                                 at::TensorOptions options) {
  TORCH_CHECK((act == Act::kPrelu) == defined(prelu), op,
              ": act_weight is PReLU's weight: give it with act=prelu and only then");
  if (act != Act::kPrelu) return at::full({C}, act == Act::kLeakyRelu ? slope : 0.0, options);
  TORCH_CHECK(prelu->numel() == 1 || prelu->numel() == C, op, ": PReLU's weight must have 1 or ", C,
              " elements, got ", prelu->numel());
  TORCH_CHECK(prelu->device() == options.device(), op, ": PReLU's weight is on ", prelu->device(),
              ", y on ", options.device());
  return prelu->to(options).reshape({-1}).expand({C}).contiguous();
}

}  // namespace unet_fast
