"""conv_bias_relu: relu(conv2d(x, weight, bias)) with the ReLU fused into the convolution, the eval
path of Conv -> BatchNorm -> ReLU once BatchNorm is folded into weight and bias (`fold`).

CPU: oneDNN's convolution with a ReLU post-op (prepacked weights welcome); CUDA: cuDNN, then an
in-place ReLU; Triton: an implicit-GEMM convolution with the ReLU in its epilogue. Backward is
ATen's: the ReLU mask from the output, then convolution_backward.
"""

from typing import Optional

import torch

from .. import _backend, reference
from .._common import conv_backward, empty_like_layout, fold
from ._checks import autocast_inputs, check_conv

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
    torch.library.register_autograd("unet_fast::conv_bias_relu", _backward, setup_context=_setup)
