"""conv_bias_relu: relu(conv2d(x, weight, bias)) with the ReLU fused into the convolution, the eval
path of Conv -> BatchNorm -> ReLU once BatchNorm is folded into weight and bias (`fold`).

CPU: oneDNN's convolution (prepacked weights welcome), then ATen's in-place ReLU (oneDNN's
post-op would map NaN to 0); CUDA: cuDNN, then an in-place ReLU; Triton: an implicit-GEMM
convolution with the ReLU in its epilogue. Backward is ATen's: the ReLU mask from the output,
then convolution_backward.

`conv_bn_relu_frozen` is the inference entry: it folds (and prepacks) once per parameter version
and keeps the result, inside an op that torch.compile leaves opaque, so a compiled model keeps
the cache too. On the CPU it computes wide 3x3 layers by Winograd F(2x2, 3x3)
(`conv_bias_relu_winograd`, weights transformed once by `winograd_weight`; docs/library.md).
"""

import weakref
from typing import Optional

import torch

from .. import _backend, reference
from .._common import conv_backward, empty_like_layout, fold, stats_dtype
from ._checks import autocast_inputs, check_conv, needs_grad

Tensor = torch.Tensor
_triton_kernels = None


def triton_kernels():
    """unet_fast.triton.conv_bias_relu, imported (kernels decorated, autograd registered) on first
    use."""
    global _triton_kernels
    if _triton_kernels is None:
        from ..triton import conv_bias_relu as kernels

        kernels.conv_bias_relu.register_autograd(_backward, setup_context=_setup)
        _triton_kernels = kernels
    return _triton_kernels


def conv_bias_relu(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int = 1, *, backend: str = "auto"
) -> Tensor:
    """relu(conv2d(x, weight, bias, padding=padding)), NaN kept as F.relu keeps it."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_conv(x, weight, bias, None, None, None, None, padding, False)
    chosen = _backend.resolve(backend, x.device, "conv_bias_relu")
    if chosen == "reference":
        return reference.conv_bias_relu(x, weight, bias, padding)
    if chosen == "triton":
        return triton_kernels().conv_relu(x, weight, bias, padding)
    return torch.ops.unet_fast.conv_bias_relu(x, weight, bias, padding)


def conv_bn_relu_eval(
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, padding, backend
):
    """Conv -> BatchNorm (running statistics) -> ReLU, BatchNorm folded into the convolution."""
    folded = fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
    return conv_bias_relu(x, *folded, padding, backend=backend)


def prepack(weight: Tensor, x: Tensor, padding: int) -> Tensor:
    """The weight in oneDNN's blocked layout for this input shape, so no convolution reorders it
    again (that reorder dominates deep, small-spatial layers: 512 channels at 32x32 run 1.4x
    faster prepacked). Weights of other devices and dtypes are returned as they are."""
    if (
        x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.bfloat16)
        or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)
    ):
        return weight
    return torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.to_mkldnn(), [padding] * 2, [1, 1], [1, 1], 1, list(x.shape)
    )


# The least C_in * C_out / (C_in + C_out) at which Winograd F(2x2, 3x3) replaces the direct
# convolution: the products it saves grow as C_in * C_out per tile, its transforms' cost as
# C_in + C_out. Measured on a 2-core AMD EPYC against oneDNN (docs/results.md): 1.2x-1.8x per
# layer from 128 on, 0.96x-1.4x at 64-85 (128 channels in and out), slower below in float32;
# bfloat16 keeps narrow layers' tiles in L2 from transform to output, 1.08x at 43 (128 -> 64).
WINOGRAD_FROM = {torch.float32: 64, torch.bfloat16: 40}
# Inputs and weights past this magnitude take the direct convolution (the kernel checks inputs).
WINOGRAD_RANGE = 2.0**48


def winograd_pays(x: Tensor, weight: Tensor, padding: int) -> bool:
    """Whether the CPU eval path computes this 3x3 convolution by Winograd F(2x2, 3x3): in
    float32, or in bfloat16 on CPUs with AVX512-BF16 from float32 weights (autocast), whose
    transform is rounded once as autocast rounds the weights (weights already in bfloat16 would be
    rounded twice, putting a layer's error past the bfloat16 rule)."""
    c_out, c_in, kh, kw = weight.shape
    if x.dtype == torch.bfloat16 and not (weight.dtype == torch.float32 and _backend.BF16_GEMM):
        return False
    return (
        _backend.CPU_WINOGRAD
        and x.device.type == "cpu"
        and (kh, kw, padding) == (3, 3, 1)
        and c_in % 32 == 0
        and c_out % 32 == 0
        and x.dtype in WINOGRAD_FROM
        and c_in * c_out >= WINOGRAD_FROM[x.dtype] * (c_in + c_out)
    )


def winograd_weight(weight: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    """G w G^T for every (out, in) channel pair, computed in float32, in `dtype` and the layout
    conv_bias_relu_winograd takes: (16, C_in, C_out) in float32; in bfloat16 packed for its
    matrix products, (16, C_out / 32, C_in / 2, 32, 2) (panels of 32 output channels, input
    channels in interleaved pairs). None when a weight is NaN, Inf or past WINOGRAD_RANGE."""
    weight = weight.detach()
    if not bool(weight.abs().amax() <= WINOGRAD_RANGE):
        return None
    return torch.ops.unet_fast.winograd_weight(weight, dtype)


def _winograd_weight_fake(weight, dtype):
    c_out, c_in = weight.shape[:2]
    shape = (16, c_out // 32, c_in // 2, 32, 2) if dtype == torch.bfloat16 else (16, c_in, c_out)
    return weight.new_empty(shape, dtype=dtype)


# id(conv weight) -> (weakref to it, {compute dtype: (key, (folded weight, folded bias, Winograd
# weight or None))}); an entry goes with its weight
_frozen: dict = {}


def frozen_entries(weight: Tensor) -> dict:
    """The folded weights kept for the convolution `weight`, by compute dtype."""
    entry = _frozen.get(id(weight))
    if entry is None or entry[0]() is not weight:
        key = id(weight)
        entry = _frozen[key] = (weakref.ref(weight, lambda _: _frozen.pop(key, None)), {})
    return entry[1]


def winograd_layers(model: torch.nn.Module) -> tuple[int, int]:
    """(convolutions computed by Winograd, convolutions folded) among `model`'s parameters in the
    inference cache, over the compute dtypes it has run in."""
    winograd = folded = 0
    for p in model.parameters():
        entry = _frozen.get(id(p))
        if entry is not None and entry[0]() is p and entry[1]:
            folded += 1
            winograd += any(cached[1][2] is not None for cached in entry[1].values())
    return winograd, folded


@torch.library.custom_op("unet_fast::conv_bn_relu_frozen", mutates_args=())
def _conv_bn_relu_frozen(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    padding: int,
    backend: str,
) -> Tensor:
    sources = (weight, bias, bn_weight, bn_bias, running_mean, running_var)
    prepacked = backend == "cpu"
    key = tuple(
        None if t is None else (id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in sources
    ) + (eps, x.shape, prepacked, _backend.CPU_WINOGRAD)
    entries = frozen_entries(weight)
    cached = entries.get(x.dtype)
    if cached is None or cached[0] != key:
        folded_weight, folded_bias = fold(*sources, eps, dtype=stats_dtype(weight))
        winograd = None
        if prepacked and winograd_pays(x, weight, padding):
            winograd = winograd_weight(folded_weight, x.dtype)
        folded_weight, folded_bias = folded_weight.to(x.dtype), folded_bias.to(x.dtype)
        if prepacked:
            folded_weight = prepack(folded_weight, x, padding)
        entries[x.dtype] = cached = key, (folded_weight, folded_bias, winograd)
    folded_weight, folded_bias, winograd = cached[1]
    if winograd is not None:
        return torch.ops.unet_fast.conv_bias_relu_winograd(x, folded_weight, folded_bias, winograd)
    return conv_bias_relu(x, folded_weight, folded_bias, padding, backend=backend)


@_conv_bn_relu_frozen.register_fake
def _frozen_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, padding, _):
    return _fake(x, weight, bias, padding)


def conv_bn_relu_frozen(
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, padding, backend="auto"
):
    """Inference Conv -> BatchNorm (running statistics) -> ReLU with parameters that no gradient
    reaches: BatchNorm is folded into the convolution (and, on the CPU backend, the weight
    prepacked for oneDNN) once per compute dtype and input shape, and kept until a parameter or
    statistic changes (identity, storage or version) or the weight is freed. Under autocast the
    input takes the autocast dtype and the folded weights are cast once."""
    checked = x
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        x = x.to(torch.get_autocast_dtype(x.device.type))
        # the folded weights take x's dtype: check x's shape and device against the weights'
        checked = torch.empty((), dtype=weight.dtype, device=x.device).expand(x.shape)
    check_conv(checked, weight, bias, bn_weight, bn_bias, running_mean, running_var, padding, False)
    if needs_grad(weight, bias, bn_weight, bn_bias):
        raise ValueError("conv_bn_relu_frozen: parameters need gradients; use conv_bn_relu")
    chosen = _backend.resolve(backend, x.device, "conv_bias_relu")
    return _conv_bn_relu_frozen(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, padding, chosen
    )


def _fake(x, weight, bias, padding):
    h, w = (x.shape[i] + 2 * padding - weight.shape[i] + 1 for i in (2, 3))
    return empty_like_layout(x, (x.shape[0], weight.shape[0], h, w))


def _setup(ctx, inputs, output):
    x, weight, bias, padding = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.has_bias, ctx.padding = bias is not None, padding


def _backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    # F.relu's backward: the gradient passes unless out <= 0 (NaN outputs pass it)
    grad_y = torch.ops.aten.threshold_backward(grad_out, out, 0)
    grad_x, grad_w, grad_b = conv_backward(
        grad_y,
        x,
        weight,
        ctx.padding,
        (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2],
        ),
    )
    return grad_x, grad_w, grad_b, None


if _backend.EXTENSION_ERROR is None:
    torch.library.register_fake("unet_fast::conv_bias_relu", _fake)
    torch.library.register_fake(
        "unet_fast::conv_bias_relu_winograd", lambda x, weight, bias, _: _fake(x, weight, bias, 1)
    )
    torch.library.register_fake("unet_fast::winograd_weight", _winograd_weight_fake)
    torch.library.register_autograd("unet_fast::conv_bias_relu", _backward, setup_context=_setup)
