"""Triton implicit-GEMM 3x3 convolution: the training double conv (BN+ReLU of layer 1 in layer 2's
prologue, statistics in the epilogues) and the eval convolution (bias + ReLU in the epilogue)."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
from torch.library import triton_op, wrap_triton

from ..ops.conv_bn_relu import bn_affine, conv_bias_relu_backward, conv_bias_relu_setup
from . import kernels
from .batch_norm_relu import channel_map, dense, batch_norm_relu_backward, check_dtype

Tensor = torch.Tensor


@triton_op("unet_fast::conv_bias_relu_triton", mutates_args=())
def conv_bias_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int) -> Tensor:
    """Eval path: relu(conv3x3(x) + bias) in one implicit-GEMM kernel (ReLU in its epilogue)."""
    return _conv3x3(x, weight, bias, padding, None, relu=True)[0]


def conv_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int) -> Tensor:
    """The Triton backend's eval convolution: the implicit-GEMM kernel for 3x3 weights, ATen's
    convolution and an in-place ReLU for other sizes."""
    check_dtype(x)
    if weight.shape[2:] == (3, 3):
        return conv_bias_relu(x, weight, bias, padding)
    return F.conv2d(x, weight, bias, padding=padding).relu_()


def _conv3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int,
             prologue: Optional[Tensor], relu: bool):
    """Launches the implicit-GEMM convolution: (y channels_last, per-tile partial statistics)."""
    x = x.contiguous(memory_format=torch.channels_last)
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    h_out, w_out = h + 2 * padding - 2, w + 2 * padding - 2
    taps = weight.permute(2, 3, 1, 0).reshape(9, c_in, c_out).contiguous()
    y = x.new_empty((n, c_out, h_out, w_out)).contiguous(memory_format=torch.channels_last)
    max_tiles = triton.cdiv(n * h_out * w_out, kernels.CONV_MIN_BLOCK_M)
    partial = x.new_zeros((3, max_tiles, c_out), dtype=torch.float32)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    grid = lambda meta: (triton.cdiv(n * h_out * w_out, meta["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(c_out, meta["BLOCK_N"]))
    wrap_triton(kernels.conv3x3_bn_kernel)[grid](
        x, taps, bias if bias is not None else taps, prologue if prologue is not None else taps,
        y, partial, n, h, w, c_in, c_out, h_out, w_out, padding, max_tiles,
        PROLOGUE=prologue is not None, HAS_BIAS=bias is not None, RELU=relu, PRECISION=precision)
    return y, partial


def conv3x3_stats(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int, eps: float,
                  prologue: Optional[Tensor] = None):
    """The implicit-GEMM convolution: (y channels_last, mean, invstd, unbiased var) with
    `prologue` (2, C_in) = (scale, shift) applying relu(x scale + shift) to x on the fly."""
    y, partial = _conv3x3(x, weight, bias, padding, prologue, relu=False)
    pixels = y.shape[0] * y.shape[2] * y.shape[3]
    sums, squares, counts = partial.double()
    mean = sums.sum(0) / pixels
    # Chan et al.'s combination; tiles not launched have count 0 and contribute nothing
    m2 = (squares + counts * (sums / counts.clamp_min(1) - mean) ** 2).sum(0)
    var = m2 / pixels
    return y, mean, torch.rsqrt(var + eps), m2 / max(pixels - 1, 1)


@triton_op("unet_fast::double_conv_triton", mutates_args=())
def double_conv(x: Tensor, weight1: Tensor, bias1: Optional[Tensor], bn_weight1: Optional[Tensor],
                bn_bias1: Optional[Tensor], weight2: Tensor, bias2: Optional[Tensor],
                bn_weight2: Optional[Tensor], bn_bias2: Optional[Tensor], eps1: float,
                eps2: float, padding: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                     Tensor, Tensor, Tensor, Tensor]:
    """Training double conv writing only y1, y2 and the output: the second convolution applies
    the first BatchNorm + ReLU in its prologue; both accumulate their statistics in the epilogue.
    Returns (out, y1, y2, mean1, invstd1, var1, mean2, invstd2, var2) like unet_fast::double_conv."""
    y1, mean1, invstd1, var1 = conv3x3_stats(x, weight1, bias1, padding, eps1)
    scale1, shift1 = bn_affine(mean1, invstd1, bn_weight1, bn_bias1)
    y2, mean2, invstd2, var2 = conv3x3_stats(
        y1, weight2, bias2, padding, eps2, torch.stack([scale1, shift1]).float().contiguous())
    scale2, shift2 = bn_affine(mean2, invstd2, bn_weight2, bn_bias2)
    out = channel_map(torch.empty_like(y2), y2, y2, torch.stack([scale2, shift2]).float().contiguous(),
                      True, backward=False)
    return (out, y1, y2, *[t.float() for t in (mean1, invstd1, var1, mean2, invstd2, var2)])


def _apply(y, weight, bias, mean, invstd):
    """relu(bn(y)) with given statistics: the recomputed middle activation."""
    y, channels_last = dense(y)
    scale, shift = bn_affine(mean, invstd, weight, bias)
    return channel_map(torch.empty_like(y), y, y, torch.stack([scale, shift]).float().contiguous(),
                       channels_last, backward=False)


def _double_setup(ctx, inputs, output):
    x, w1, b1, g1, be1, w2, b2, g2, be2, _, _, padding = inputs
    _, y1, y2, mean1, invstd1, _, mean2, invstd2, _ = output
    ctx.save_for_backward(x, w1, y1, g1, be1, mean1, invstd1, w2, y2, g2, be2, mean2, invstd2)
    ctx.has_bias, ctx.padding = (b1 is not None, b2 is not None), padding
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _conv_backward(grad_y, x, weight, has_bias, padding, needs_input):
    return torch.ops.aten.convolution_backward(
        grad_y, x, weight, [weight.shape[0]] if has_bias else None, [1, 1], [padding] * 2,
        [1, 1], False, [0, 0], 1, [needs_input, True, has_bias])


def _double_backward(ctx, grad_out, *_):
    if grad_out is None:
        return (None,) * 12
    x, w1, y1, g1, be1, mean1, invstd1, w2, y2, g2, be2, mean2, invstd2 = ctx.saved_tensors
    (has_b1, has_b2), padding = ctx.has_bias, ctx.padding
    grad_y2, grad_g2, grad_be2 = batch_norm_relu_backward(grad_out, y2, g2, be2, mean2, invstd2)
    grad_a1, grad_w2, grad_b2 = _conv_backward(grad_y2, _apply(y1, g1, be1, mean1, invstd1), w2,
                                               has_b2, padding, True)
    grad_y1, grad_g1, grad_be1 = batch_norm_relu_backward(grad_a1, y1, g1, be1, mean1, invstd1)
    grad_x, grad_w1, grad_b1 = _conv_backward(grad_y1, x, w1, has_b1, padding,
                                              ctx.needs_input_grad[0])
    keep = lambda grad, t: grad if t is not None else None  # noqa: E731
    return (grad_x, grad_w1, grad_b1, keep(grad_g1, g1), keep(grad_be1, be1), grad_w2, grad_b2,
            keep(grad_g2, g2), keep(grad_be2, be2), None, None, None)


double_conv.register_autograd(_double_backward, setup_context=_double_setup)
# the same formula as the C++ eval op's: threshold, then ATen's convolution backward
conv_bias_relu.register_autograd(conv_bias_relu_backward, setup_context=conv_bias_relu_setup)
