"""The Triton backend's ops (torch.library.triton_op, so torch.compile traces into the kernels)
and the compositions that use them: BatchNorm + ReLU forward/backward, crop_concat, and
conv_bn_relu as an ATen convolution followed by the Triton BatchNorm + ReLU."""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
from torch.library import triton_op, wrap_triton

from . import kernels

Tensor = torch.Tensor
BLOCK = 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dense(t: Tensor) -> Tuple[Tensor, bool, Tuple[int, int, int]]:
    """t dense in its memory format, whether that is channels_last, and its (N, C, HW) strides."""
    channels_last = torch._prims_common.suggest_memory_format(t) == torch.channels_last
    t = t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    n, c, h, w = t.shape
    return t, channels_last, ((h * w * c, 1, c) if channels_last else (c * h * w, h * w, 1))


def _channel_sums(y, dy, coef, strides, backward: bool):
    n, c, h, w = y.shape
    count = n * h * w
    blocks = triton.cdiv(count, BLOCK)
    chunk = BLOCK * triton.cdiv(blocks, min(blocks, 64))
    chunks = triton.cdiv(count, chunk)
    partial = y.new_empty((2, c, chunks), dtype=torch.float32)
    wrap_triton(kernels.channel_sums_kernel)[(c, chunks)](
        y, dy, coef, partial, n, c, h * w, *strides, CHUNK=chunk, BLOCK=BLOCK, BACKWARD=backward)
    return partial.double().sum(-1)  # float64 across programs


def _channel_map(out, y, dy, coef, strides, channels_last: bool, backward: bool):
    n, c, h, w = y.shape
    wrap_triton(kernels.channel_map_kernel)[(triton.cdiv(y.numel(), BLOCK),)](
        out, y, dy, coef, n, c, h * w, *strides, BLOCK=BLOCK, CHANNELS_LAST=channels_last,
        BACKWARD=backward)
    return out


def _affine(mean, invstd, weight, bias):
    scale = invstd if weight is None else weight.double() * invstd
    shift = -mean * scale if bias is None else bias.double() - mean * scale
    return scale, shift


@triton_op("unet_fast::batch_norm_relu_triton", mutates_args=())
def batch_norm_relu(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton twin of unet_fast::batch_norm_relu: (out, mean, invstd, unbiased var)."""
    y, channels_last, strides = _dense(y)
    n, c, h, w = y.shape
    count = n * h * w
    zeros = y.new_zeros(c, dtype=torch.float32)
    if count == 0:
        return torch.empty_like(y), zeros, zeros.clone(), zeros.clone()
    first = y[0, :, 0, 0].float().contiguous()  # per-channel shift: exact variance at any mean
    sums = _channel_sums(y, y, first, strides, backward=False)
    shifted_mean = sums[0] / count
    var = (sums[1] / count - shifted_mean ** 2).clamp_min(0)
    mean = first.double() + shifted_mean
    invstd = torch.rsqrt(var + eps)
    scale, shift = _affine(mean, invstd, weight, bias)
    coef = torch.stack([scale, shift]).float().contiguous()
    out = _channel_map(torch.empty_like(y), y, y, coef, strides, channels_last, backward=False)
    return out, mean.float(), invstd.float(), (var * count / max(count - 1, 1)).float()


@triton_op("unet_fast::batch_norm_relu_backward_triton", mutates_args=())
def batch_norm_relu_backward(grad_out: Tensor, y: Tensor, weight: Optional[Tensor],
                             bias: Optional[Tensor], mean: Tensor,
                             invstd: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_y, grad_weight, grad_bias), as the C++ kernel: grad_y = m dy k + a y + b."""
    y, channels_last, strides = _dense(y)
    dy = grad_out.to(y.dtype).contiguous(memory_format=torch.channels_last if channels_last
                                         else torch.contiguous_format)
    n, c, h, w = y.shape
    count = n * h * w
    mean, invstd = mean.double(), invstd.double()
    scale, shift = _affine(mean, invstd, weight, bias)
    sums = _channel_sums(y, dy, torch.stack([scale, shift, mean]).float().contiguous(), strides,
                         backward=True)
    gain = scale
    slope = -gain * invstd * invstd * sums[1] / count
    offset = -gain * sums[0] / count - slope * mean
    coef = torch.stack([scale, shift, gain, slope, offset]).float().contiguous()
    grad_y = _channel_map(torch.empty_like(y), y, dy, coef, strides, channels_last, backward=True)
    dtype = weight.dtype if weight is not None else torch.float32
    return grad_y, (sums[1] * invstd).to(dtype), sums[0].to(dtype)


def _leading_pad(target: int, current: int) -> int:
    return (target - current) // 2  # F.pad's split: Python floor division


def _shifted_concat(out: Tensor, first: Tensor, first_offset, second: Tensor, second_offset):
    """out's channels [0, C1) from `first`, the rest from `second`, each shifted (top, left)."""
    n, c, h, w = out.shape
    channels_last = not out.is_contiguous()
    wrap_triton(kernels.shifted_concat_kernel)[(triton.cdiv(out.numel(), BLOCK),)](
        out, first, second, n, c, h, w, first.shape[1],
        first.shape[2], first.shape[3], *first_offset, *first.stride(),
        second.shape[2], second.shape[3], *second_offset, *second.stride(),
        BLOCK=BLOCK, CHANNELS_LAST=channels_last)
    return out


def _empty(shape, like: Tensor) -> Tensor:
    fmt = torch._prims_common.suggest_memory_format(like)
    return like.new_empty(shape).contiguous(memory_format=fmt)


@triton_op("unet_fast::crop_concat_triton", mutates_args=())
def crop_concat(skip: Tensor, up: Tensor, size: List[int]) -> Tensor:
    """Triton twin of unet_fast::crop_concat."""
    out = _empty((skip.shape[0], skip.shape[1] + up.shape[1], *size), skip)
    if out.numel() == 0:
        return out
    offsets = [(_leading_pad(size[0], t.shape[2]), _leading_pad(size[1], t.shape[3]))
               for t in (skip, up)]
    return _shifted_concat(out, skip, offsets[0], up, offsets[1])


@triton_op("unet_fast::crop_concat_backward_triton", mutates_args=())
def crop_concat_backward(grad: Tensor, skip_channels: int, skip_size: List[int],
                         up_size: List[int]) -> Tuple[Tensor, Tensor]:
    n, c = grad.shape[:2]
    grads = []
    for begin, end, size in ((0, skip_channels, skip_size), (skip_channels, c, up_size)):
        part = grad[:, begin:end]
        out = _empty((n, end - begin, *size), grad)
        if out.numel():
            offset = (-_leading_pad(grad.shape[2], size[0]), -_leading_pad(grad.shape[3], size[1]))
            _shifted_concat(out, part, offset, part, offset)
        grads.append(out)
    return grads[0], grads[1]


def _bn_setup(ctx, inputs, output):
    y, weight, bias, _ = inputs
    ctx.save_for_backward(y, weight, bias, output[1], output[2])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _bn_backward(ctx, grad_out, *_):
    if grad_out is None:
        return None, None, None, None
    y, weight, bias, mean, invstd = ctx.saved_tensors
    grad_y, grad_weight, grad_bias = batch_norm_relu_backward(grad_out, y, weight, bias, mean, invstd)
    return grad_y, grad_weight if weight is not None else None, grad_bias if bias is not None else None, None


def _crop_setup(ctx, inputs, output):
    skip, up, _ = inputs
    ctx.shapes = (skip.shape[1], list(skip.shape[-2:]), list(up.shape[-2:]))


def _crop_backward(ctx, grad):
    grad_skip, grad_up = crop_concat_backward(grad, *ctx.shapes)
    return grad_skip, grad_up, None


batch_norm_relu.register_autograd(_bn_backward, setup_context=_bn_setup)
crop_concat.register_autograd(_crop_backward, setup_context=_crop_setup)


def check_dtype(x: Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"the Triton backend computes float32, bfloat16 and float16, got {x.dtype}")


def batch_norm_relu_stats(y, weight, bias, eps):
    """(out, mean, unbiased var) of the Triton BatchNorm + ReLU, for the ops' wrappers."""
    check_dtype(y)
    out, mean, _, var = batch_norm_relu(y, weight, bias, eps)
    return out, mean, var


@triton_op("unet_fast::conv_bias_relu_triton", mutates_args=())
def conv_bias_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int) -> Tensor:
    """Eval path: relu(conv3x3(x) + bias) in one implicit-GEMM kernel (ReLU in its epilogue)."""
    return _conv3x3(x, weight, bias, padding, None, relu=True)[0]


def _conv_bias_relu_setup(ctx, inputs, output):
    x, weight, bias, padding = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.has_bias, ctx.padding = bias is not None, padding


def _conv_bias_relu_backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    grad_x, grad_w, grad_b = _conv_backward(torch.ops.aten.threshold_backward(grad_out, out, 0),
                                            x, weight, ctx.has_bias, ctx.padding,
                                            ctx.needs_input_grad[0])
    return grad_x, grad_w, grad_b, None


def conv_relu(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int) -> Tensor:
    """The Triton backend's eval convolution: the implicit-GEMM kernel for 3x3 weights, ATen's
    convolution and an in-place ReLU for other sizes."""
    check_dtype(x)
    if weight.shape[2:] == (3, 3):
        return conv_bias_relu(x, weight, bias, padding)
    return F.conv2d(x, weight, bias, padding=padding).relu_()


CONV_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}


def _conv3x3(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int,
             prologue: Optional[Tensor], relu: bool):
    """Launches the implicit-GEMM convolution: (y channels_last, per-tile partial statistics)."""
    x = x.contiguous(memory_format=torch.channels_last)
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    h_out, w_out = h + 2 * padding - 2, w + 2 * padding - 2
    taps = weight.permute(2, 3, 1, 0).reshape(9, c_in, c_out).contiguous()
    y = x.new_empty((n, c_out, h_out, w_out)).contiguous(memory_format=torch.channels_last)
    pixels = n * h_out * w_out
    tiles = triton.cdiv(pixels, CONV_BLOCKS["BLOCK_M"])
    partial = x.new_empty((2, tiles, c_out), dtype=torch.float32)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    wrap_triton(kernels.conv3x3_bn_kernel)[(tiles, triton.cdiv(c_out, CONV_BLOCKS["BLOCK_N"]))](
        x, taps, bias if bias is not None else taps, prologue if prologue is not None else taps,
        y, partial, n, h, w, c_in, c_out, h_out, w_out, padding, PROLOGUE=prologue is not None,
        HAS_BIAS=bias is not None, RELU=relu, PRECISION=precision, **CONV_BLOCKS)
    return y, partial


def conv3x3_stats(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int, eps: float,
                  prologue: Optional[Tensor] = None):
    """The implicit-GEMM convolution: (y channels_last, mean, invstd, unbiased var) with
    `prologue` (2, C_in) = (scale, shift) applying relu(x scale + shift) to x on the fly."""
    y, partial = _conv3x3(x, weight, bias, padding, prologue, relu=False)
    tiles = partial.shape[1]
    pixels = y.shape[0] * y.shape[2] * y.shape[3]
    counts = torch.full((tiles, 1), float(CONV_BLOCKS["BLOCK_M"]), dtype=torch.float64,
                        device=x.device)
    counts[-1] = pixels - CONV_BLOCKS["BLOCK_M"] * (tiles - 1)
    sums, squares = partial.double()
    mean = sums.sum(0) / pixels
    m2 = (squares + counts * (sums / counts - mean) ** 2).sum(0)  # Chan et al.'s combination
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
    scale1, shift1 = _affine(mean1, invstd1, bn_weight1, bn_bias1)
    y2, mean2, invstd2, var2 = conv3x3_stats(
        y1, weight2, bias2, padding, eps2, torch.stack([scale1, shift1]).float().contiguous())
    scale2, shift2 = _affine(mean2, invstd2, bn_weight2, bn_bias2)
    _, channels_last, strides = _dense(y2)
    out = _channel_map(torch.empty_like(y2), y2, y2, torch.stack([scale2, shift2]).float().contiguous(),
                       strides, channels_last, backward=False)
    return (out, y1, y2, *[t.float() for t in (mean1, invstd1, var1, mean2, invstd2, var2)])


def _apply(y, weight, bias, mean, invstd):
    """relu(bn(y)) with given statistics: the recomputed middle activation."""
    y, channels_last, strides = _dense(y)
    scale, shift = _affine(mean.double(), invstd.double(), weight, bias)
    return _channel_map(torch.empty_like(y), y, y, torch.stack([scale, shift]).float().contiguous(),
                        strides, channels_last, backward=False)


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
conv_bias_relu.register_autograd(_conv_bias_relu_backward, setup_context=_conv_bias_relu_setup)
