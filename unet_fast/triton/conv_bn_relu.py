"""Triton Conv -> BatchNorm -> ReLU in training: BatchNorm (batch statistics) + ReLU forward and
backward, and the double conv whose second convolution applies the first BatchNorm + ReLU in its
prologue. triton_ops whose autograd is registered in unet_fast/ops/conv_bn_relu.py."""

from typing import Optional, Tuple

import torch
from torch.library import triton_op

from .._common import bn_affine
from .channelwise import channel_map, channel_sums, check_dtype, dense
from .conv3x3 import conv3x3_stats

Tensor = torch.Tensor


@triton_op("unet_fast::batch_norm_relu_triton", mutates_args=())
def batch_norm_relu(
    y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton twin of unet_fast::batch_norm_relu: (out, mean, invstd, unbiased var)."""
    y, channels_last = dense(y)
    n, c, h, w = y.shape
    count = n * h * w
    zeros = y.new_zeros(c, dtype=torch.float32)
    if count == 0:
        return torch.empty_like(y), zeros, zeros.clone(), zeros.clone()
    sums = channel_sums(y, y, y, channels_last, backward=False)
    first = y[0, :, 0, 0].double()  # the shift the sums were taken around
    shifted_mean = sums[0] / count
    var = (sums[1] / count - shifted_mean**2).clamp_min(0)
    mean = first + shifted_mean
    invstd = torch.rsqrt(var + eps)
    scale, shift = bn_affine(mean, invstd, weight, bias)
    coef = torch.stack([scale, shift]).float().contiguous()
    out = channel_map(torch.empty_like(y), y, y, coef, channels_last, backward=False)
    return out, mean.float(), invstd.float(), (var * count / max(count - 1, 1)).float()


@triton_op("unet_fast::batch_norm_relu_backward_triton", mutates_args=())
def batch_norm_relu_backward(
    grad_out: Tensor,
    y: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_y, grad_weight, grad_bias): grad_y = m dy k + a (y - mean) + b."""
    y, channels_last = dense(y)
    dy = grad_out.to(y.dtype).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    n, c, h, w = y.shape
    count = n * h * w
    mean, invstd = mean.double(), invstd.double()
    scale, shift = bn_affine(mean, invstd, weight, bias)
    sums = channel_sums(
        y, dy, torch.stack([scale, shift, mean]).float().contiguous(), channels_last, backward=True
    )
    gain = scale
    slope = -gain * invstd * invstd * sums[1] / count
    offset = -gain * sums[0] / count
    coef = torch.stack([scale, shift, gain, slope, offset, mean]).float().contiguous()
    grad_y = channel_map(torch.empty_like(y), y, dy, coef, channels_last, backward=True)
    dtype = weight.dtype if weight is not None else torch.float32
    return grad_y, (sums[1] * invstd).to(dtype), sums[0].to(dtype)


def batch_norm_relu_stats(y, weight, bias, eps):
    """(out, mean, unbiased var) of the Triton BatchNorm + ReLU, for the ops' wrappers."""
    check_dtype(y)
    out, mean, _, var = batch_norm_relu(y, weight, bias, eps)
    return out, mean, var


@triton_op("unet_fast::double_conv_triton", mutates_args=())
def double_conv(
    x: Tensor,
    weight1: Tensor,
    bias1: Optional[Tensor],
    bn_weight1: Optional[Tensor],
    bn_bias1: Optional[Tensor],
    weight2: Tensor,
    bias2: Optional[Tensor],
    bn_weight2: Optional[Tensor],
    bn_bias2: Optional[Tensor],
    eps1: float,
    eps2: float,
    padding: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training double conv writing only y1, y2 and the output: the second convolution applies
    the first BatchNorm + ReLU in its prologue; both accumulate their statistics in the epilogue.
    Returns (out, y1, y2, mean1, invstd1, var1, mean2, invstd2, var2) like unet_fast::double_conv."""
    y1, mean1, invstd1, var1 = conv3x3_stats(x, weight1, bias1, padding, eps1)
    scale1, shift1 = bn_affine(mean1, invstd1, bn_weight1, bn_bias1)
    y2, mean2, invstd2, var2 = conv3x3_stats(
        y1, weight2, bias2, padding, eps2, torch.stack([scale1, shift1]).float().contiguous()
    )
    scale2, shift2 = bn_affine(mean2, invstd2, bn_weight2, bn_bias2)
    out = channel_map(
        torch.empty_like(y2),
        y2,
        y2,
        torch.stack([scale2, shift2]).float().contiguous(),
        True,
        backward=False,
    )
    return (out, y1, y2, *[t.float() for t in (mean1, invstd1, var1, mean2, invstd2, var2)])


def batch_norm_relu_apply(y, weight, bias, mean, invstd):
    """relu(bn(y)) with given statistics: the recomputed middle activation."""
    y, channels_last = dense(y)
    scale, shift = bn_affine(mean, invstd, weight, bias)
    return channel_map(
        torch.empty_like(y),
        y,
        y,
        torch.stack([scale, shift]).float().contiguous(),
        channels_last,
        backward=False,
    )
