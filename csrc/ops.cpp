// Every schema of the unet_fast library, in one place. Kernels register themselves per backend in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; autograd and fake (meta) kernels live in unet_fast/ops/*.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/bf16_gemm.h"
#include "cpu/buffer_cache.h"

namespace {

// (cached bytes, limit bytes, hits, misses) of the CPU buffer cache.
PyObject* cpu_cache_info(PyObject*, PyObject*) {
  const auto info = unet_fast::cpu::cache_info();
  return Py_BuildValue("(LLLL)", info.cached_bytes, info.limit_bytes, info.hits, info.misses);
}

PyObject* cpu_cache_reset(PyObject*, PyObject* limit) {
  const long long bytes = PyLong_AsLongLong(limit);
  if (bytes == -1 && PyErr_Occurred()) return nullptr;
  unet_fast::cpu::cache_reset(bytes);
  Py_RETURN_NONE;
}

// Whether this CPU runs the bfloat16 Winograd kernel's matrix products (AVX512-BF16).
PyObject* cpu_has_bf16_gemm(PyObject*, PyObject*) {
  return PyBool_FromLong(unet_fast::cpu::has_bf16_gemm());
}

PyMethodDef methods[] = {
    {"cpu_cache_info", cpu_cache_info, METH_NOARGS, nullptr},
    {"cpu_cache_reset", cpu_cache_reset, METH_O, nullptr},
    {"cpu_has_bf16_gemm", cpu_has_bf16_gemm, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// `import unet_fast._C` loads this shared library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

// The kernels choose their output layouts from their inputs' (channels_last in, channels_last
// out): compilers must hand them inputs with exactly the strides they were traced with.
static const std::vector<at::Tag> kExactStrides = {at::Tag::needs_exact_strides};

TORCH_LIBRARY(unet_fast, m) {
  // [skip, up] on channels, each centre-cropped or zero-padded to `size` (H, W).
  m.def("crop_concat(Tensor skip, Tensor up, SymInt[2] size) -> Tensor", kExactStrides);
  // The inverse crop/pad of each channel slice of grad back to its input's spatial size.
  m.def(
      "crop_concat_backward(Tensor grad, SymInt skip_channels, SymInt[2] skip_size, "
      "SymInt[2] up_size) -> (Tensor, Tensor)",
      kExactStrides);

  // relu(batch_norm(y)) with batch statistics. Returns the output and per-channel statistics
  // (float32; float64 for float64 input): mean, 1/sqrt(var + eps) and the unbiased variance
  // that the running variance averages. Functional: the caller updates running statistics.
  m.def(
      "batch_norm_relu(Tensor y, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      kExactStrides);
  // (grad_y, grad_weight, grad_bias) of batch_norm_relu; the ReLU mask is recomputed from y.
  m.def(
      "batch_norm_relu_backward(Tensor grad_out, Tensor y, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd) -> (Tensor, Tensor, Tensor)",
      kExactStrides);
  // relu(weight * (y - mean) * invstd + bias) with given statistics.
  m.def(
      "batch_norm_relu_apply(Tensor y, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd) "
      "-> Tensor",
      kExactStrides);
  // The gradient reaching x = batch_norm_relu_apply(y, ...) through max_pool2d(x, 2, 2) (the
  // maxima found again from y), plus grad_x, x's gradient from its other consumer, if given.
  m.def(
      "batch_norm_relu_max_pool_backward(Tensor grad_pooled, Tensor? grad_x, Tensor y, "
      "Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd) -> Tensor",
      kExactStrides);
  // [batch_norm_relu_apply(y, ...), up] on channels, up of y's batch and spatial size: the
  // decoder join's input rebuilt from the skip's recipe.
  m.def(
      "batch_norm_relu_concat(Tensor y, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "Tensor up) -> Tensor",
      kExactStrides);
  // Eval mode: relu(conv2d(x, weight, bias, padding)), BatchNorm already folded into weight/bias.
  m.def("conv_bias_relu(Tensor x, Tensor weight, Tensor? bias, int padding) -> Tensor",
        kExactStrides);
  // The same with padding 1 by Winograd F(2x2, 3x3), inference only: winograd_weight is weight
  // transformed (ops.conv_bias_relu.winograd_weight); inputs with NaN, Inf or huge values take
  // the direct path, with `weight`.
  m.def(
      "conv_bias_relu_winograd(Tensor x, Tensor weight, Tensor? bias, Tensor winograd_weight) -> "
      "Tensor",
      kExactStrides);
  // conv_bias_relu_winograd's winograd_weight from (C_out, C_in, 3, 3) conv weights.
  m.def("winograd_weight(Tensor weight, ScalarType dtype) -> Tensor");

  // Training mode: relu(batch_norm(conv2d(x))). Returns (out, conv output y, mean, invstd,
  // unbiased var).
  m.def(
      "conv_bn_relu(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
      "float eps, int padding) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      kExactStrides);
  // (grad_x, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias); grad_x is empty unless
  // input_grad, grad_bias empty unless has_bias.
  m.def(
      "conv_bn_relu_backward(Tensor grad_out, Tensor x, Tensor weight, bool has_bias, Tensor y, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor mean, Tensor invstd, int padding, "
      "bool input_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      kExactStrides);
  // Two conv_bn_relu in a row. Returns (out, y1, y2, mean1, invstd1, var1, mean2, invstd2, var2).
  m.def(
      "double_conv(Tensor x, Tensor weight1, Tensor? bias1, Tensor? bn_weight1, Tensor? bn_bias1, "
      "Tensor weight2, Tensor? bias2, Tensor? bn_weight2, Tensor? bn_bias2, float eps1, "
      "float eps2, int padding) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor)",
      kExactStrides);
  // The gradients of both layers' conv_bn_relu_backward, layer 1 first; recomputes relu(bn(y1)).
  m.def(
      "double_conv_backward(Tensor grad_out, Tensor x, Tensor weight1, bool has_bias1, Tensor y1, "
      "Tensor? bn_weight1, Tensor? bn_bias1, Tensor mean1, Tensor invstd1, Tensor weight2, "
      "bool has_bias2, Tensor y2, Tensor? bn_weight2, Tensor? bn_bias2, Tensor mean2, "
      "Tensor invstd2, int padding, bool input_grad) -> Tensor[]",
      kExactStrides);

  // (grad_x, grad_weight, grad_bias) of conv_transpose(x, weight, bias, stride = kernel size), a
  // 4-D or 5-D transposed convolution whose kernels do not overlap; output_mask as
  // aten::convolution_backward's (an output not asked for is empty).
  m.def(
      "up_conv_backward(Tensor grad, Tensor x, Tensor weight, bool[3] output_mask) -> "
      "(Tensor, Tensor, Tensor)",
      kExactStrides);

  // Norm + activation on a 4-D or 5-D activation with batch statistics: groups 0 is BatchNorm
  // (statistics per channel), groups G > 0 GroupNorm (per sample and group; InstanceNorm is
  // G = C); act is relu, leaky_relu (negative slope `slope`), prelu (its weight `act_weight`,
  // one per channel or one for all) or identity. Returns the output,
  // mean, 1/sqrt(var + eps) and unbiased variance per unit ((C,) or (N, G), float32; float64
  // for float64 input). Functional: the caller updates running statistics.
  m.def(
      "norm_act(Tensor y, int groups, Tensor? weight, Tensor? bias, float eps, str act, "
      "float slope, Tensor? act_weight=None) -> (Tensor, Tensor, Tensor, Tensor)",
      kExactStrides);
  // norm_act writing its output over y (inference: the conv output is not needed after), which
  // must be dense in its memory format; returns the statistics.
  m.def(
      "norm_act_(Tensor(a!) y, int groups, Tensor? weight, Tensor? bias, float eps, str act, "
      "float slope, Tensor? act_weight=None) -> (Tensor, Tensor, Tensor)");
  // act(norm(y)) with given per-unit statistics (mean, invstd as norm_act returns them): the
  // activation a chain of layers rebuilds in backward instead of keeping it.
  m.def(
      "norm_act_apply(Tensor y, int groups, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd, str act, float slope, Tensor? act_weight=None) -> Tensor",
      kExactStrides);
  // (grad_y, grad_weight, grad_bias, grad_act_weight) of norm_act (the last empty without
  // act_weight); the activation's mask is recomputed from y.
  m.def(
      "norm_act_backward(Tensor grad_out, Tensor y, int groups, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor invstd, str act, float slope, Tensor? act_weight=None) -> "
      "(Tensor, Tensor, Tensor, Tensor)",
      kExactStrides);
}
